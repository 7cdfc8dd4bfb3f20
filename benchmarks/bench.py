r"""Side-by-side fwd+bwd timings of the dense conv and the CP conv paths, plus whole-model train steps.

Run ``python -m benchmarks.bench [--quick] [--out benchmarks/results.json] [--md benchmarks/RESULTS.md]``.

What is timed (all float32, channels-last, ``jax.jit`` on the default device):

* **conv layers**: ``jax.jit(jax.value_and_grad(lambda x, w, cot: (conv(x, w) * cot).sum(),
  argnums=(0, 1)))`` with a fixed random cotangent ``cot`` (:func:`cotangent`), i.e. forward +
  gradients w.r.t. the input (not for a network's first layer) and every weight, for

  - ``dense``: ``lax.conv_general_dilated`` (what ``flax.linen.Conv`` runs) with a dense kernel
    of the same shape; the library's :func:`hocp_jax.conv_ops.dense_conv` runs the same program but
    for the Jester conv1, whose 3 input channels it runs as patches on CPU
    (:func:`hocp_jax.conv_plans.patches_conv`), like ``dense patches``;
  - ``dense patches``: the same dense conv as one matrix product of its explicit patches
    (:func:`benchmarks.patches.dense_patches`), a second JAX dense program, faster than ``lax``'s
    on most of these layers on the development CPU; the HO-CP paths are reported against both and
    against the faster of the two per layer (``faster dense``);
  - ``factorized`` / ``reconstructed`` / ``auto``: :func:`hocp_jax.conv.cp_conv` with that
    ``implementation`` (``auto`` = whichever :func:`hocp_jax.conv.choose_cp_implementation`
    picks from :func:`hocp_jax.counting.cp_path_costs`).

  Groups (padding 1 = PyTorch-style symmetric, 3-wide kernels):

  - ``jester``: the four 3x3x3 layers of the Jester 3-D ConvNet, batch 8, rank 6 x C_in:
    (3->64)@18x84x84, (64->128)@9x42x42, (128->256)@4x21x21, (256->256)@2x10x10, plus their
    sum ("stack").
  - ``resnet2d``: ResNet-18 3x3 convs (64@56x56, 128@28x28, 256@14x14, 512@7x7, and the
    stride-2 64->128@56x56), batch 8, rank = :func:`hocp_jax.counting.cp_rank_for_budget`
    (the dense parameter budget).
  - ``resnet3d``: the same layers transduced to video: a temporal mode of size 3 (padding 1)
    over 8 frames, dense kernel 3x3x3, same rank; batch 2.

* **models**: one jitted ``hocp_jax.training.make_train_step`` step (SGD + momentum) of
  ``get_model(...)`` at reduced input size (see ``MODEL_CASES``): the HO-CP ResNet-18 on
  8 images (static) vs the same parameters transduced (``transduction.transduce``, delta
  temporal factor, dense shortcuts kept) on one 8-frame clip, the dense 2-D and 3-D ResNet-18
  for reference, and the Jester HO-CP net vs the dense Jester net. Each model with dense convs
  (lax's convolution; on CPU the video models' first convs, of 3 input channels, run as patches
  in the library itself, :func:`hocp_jax.conv_plans.patches_conv`) is compiled a second time with every such conv run as a patches matrix
  product (:func:`benchmarks.patches.patches_convs`; row ``<name> (patches)``, its loss and
  gradient norm checked against the first program's), and the programs of a pair are timed
  interleaved; the targets compare the faster program of each side too.

Timing: every function is compiled, called once (warm-up), then the paths of a case are
called in interleaved rounds (so that load from other processes hits all paths alike) and
the median per path is reported (up to ``--repeats`` rounds, fewer once a case has spent its
time budget: 40 s of timed calls per conv case, 64 s per train-step pair, but at least
``MIN_ROUNDS`` = 9, so that a few slow calls of a path that runs at two speeds
(benchmarks/EXPERIMENTS.md, "Two speeds") do not decide its median; the biggest Jester layers
take 5-12 s a round, so they get 9 rounds). Train steps also
report the ratio to their reference in each round, as median (min-max): the spread of a ratio
between two programs timed side by side on a shared machine. FLOPs: XLA's
``compiled.cost_analysis()["flops"]`` of the FORWARD function vs the analytic count of :mod:`hocp_jax.counting` (dense:
``dense_flops``; factorized: ``cp_flops`` in :func:`hocp_jax.conv.best_mode_order`;
reconstructed: ``dense_flops + cp_reconstruct_flops``). Note that XLA counts only the taps
of a dense conv that fall inside the input (padded taps are free), while the shift-and-
multiply kernel really multiplies the padded zeros. FLOPs are counted on the whole-batch
program (``per_sample`` off, see :func:`xla_flops`); the timed one is the default (per sample on a
single CPU device).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import patches, peers, placement
from hocp_jax import autotune, conv, conv_ops, conv_plans, counting
from hocp_jax.padding import as_tuple, resolve_padding

PATHS = ("dense", "factorized", "reconstructed", "auto")
GROUPS = ("jester", "resnet2d", "resnet3d", "models")
CP_PATHS = PATHS[1:]
DENSE_PATCHES = "dense patches"  # the second JAX dense program (benchmarks.patches)


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """One conv layer: ``x (batch, *in_sizes, c_in)``, kernel ``(*kernel, c_in, c_out)``, CP rank."""

    group: str
    name: str
    batch: int
    in_sizes: tuple[int, ...]
    c_in: int
    c_out: int
    kernel: tuple[int, ...]
    rank: int
    stride: tuple[int, ...] | int = 1
    padding: Any = 1
    input_grad: bool = True  # False for a network's first layer: a train step never needs d loss / d images

    @property
    def modes(self) -> tuple[str, ...]:
        return conv.default_modes(len(self.in_sizes)) if len(self.in_sizes) < 3 else ("t", "h", "w")

    def geometry(self):
        n = len(self.in_sizes)
        strides = as_tuple(self.stride, n, "stride")
        pads = resolve_padding(self.padding, self.in_sizes, self.kernel, strides, (1,) * n)
        return strides, pads


def jester_cases(quick: bool) -> list[ConvCase]:
    """The four Jester 3x3x3 layers, batch 8, rank 6 x C_in (quick: /4 sizes, /8 channels, batch 2)."""
    layers = [(3, 64, (18, 84, 84)), (64, 128, (9, 42, 42)), (128, 256, (4, 21, 21)), (256, 256, (2, 10, 10))]
    out = []
    for i, (ci, co, s) in enumerate(layers):
        if quick:
            ci, co, s = max(ci // 8, 3), co // 8, (max(s[0] // 2, 2),) + tuple(max(v // 4, 4) for v in s[1:])
        out.append(ConvCase("jester", f"conv{i + 1} ({ci}->{co})@{'x'.join(map(str, s))}", 2 if quick else 8,
                            s, ci, co, (3, 3, 3), 6 * ci, input_grad=i > 0))
    return out


def resnet_cases(quick: bool) -> list[ConvCase]:
    """ResNet-18 3x3 layers in 2-D (batch 8) and transduced to 3-D (t=3 over 8 frames, batch 2)."""
    layers = [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2), (256, 256, 14, 1), (256, 512, 14, 2),
              (512, 512, 7, 1)]
    out = []
    for ci, co, s, st in layers:
        if quick:
            ci, co, s = ci // 8, co // 8, max(s // 4, 4)
        rank = counting.cp_rank_for_budget(ci, co, (3, 3))
        tag = f"({ci}->{co})@{s}x{s}" + (f"/s{st}" if st > 1 else "")
        out.append(ConvCase("resnet2d", tag, 2 if quick else 8, (s, s), ci, co, (3, 3), rank, (st, st)))
        frames = 4 if quick else 8
        out.append(ConvCase("resnet3d", f"({ci}->{co})@{frames}x{s}x{s}" + (f"/s{st}" if st > 1 else ""),
                            1 if quick else 2, (frames, s, s), ci, co, (3, 3, 3), rank, (1, st, st)))
    return sorted(out, key=lambda c: c.group)


# ----------------------------------------------------------------------------- helpers


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "processor": platform.processor(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        # the vector extensions set how fast XLA's dense convs run against the memory-bound CP ops
        "cpu_vector_flags": sorted(f for f in conv_plans.cpu_flags() if f.startswith(("avx", "fma", "amx"))),
        # sizes the factorized path's tiles on CPU (conv_plans.tile_target_bytes)
        "l2_cache_bytes": conv_plans.l2_cache_bytes(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        # None: the backend's default (TensorFloat-32 in float32 matmuls and convs on recent NVIDIA GPUs)
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **source_revision(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "XLA_", "JAX_", "LD_PRELOAD"))},
    }


def source_revision(root: str | None = None) -> dict[str, Any]:
    """The checkout the figures come from: ``{"commit": sha or None, "uncommitted_changes": bool or None}``.

    ``root``: the checkout (default: this repository's). None where it is not a git checkout (or
    git is missing); ``uncommitted_changes`` counts tracked files only, so scratch outputs in the
    tree do not mark a run.
    """
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": sha, "uncommitted_changes": bool(dirty)}


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001 - informational only
        return None


def compile_in_modes(fn: Callable, *args, per_sample: bool | None, tile_rows: int | None,
                     dense_chunks: bool | None = None) -> Any:
    """``jax.jit(fn)`` compiled for ``args`` under ``conv_plans.per_sample_mode(per_sample)``,
    ``conv_plans.tile_rows_mode(tile_rows)`` and ``conv_plans.dense_chunks_mode(dense_chunks)``,
    through a new function, since ``jax.jit`` reuses a trace of ``fn`` made outside the modes."""
    with (conv_plans.per_sample_mode(per_sample), conv_plans.tile_rows_mode(tile_rows),
          conv_plans.dense_chunks_mode(dense_chunks)):
        return jax.jit(lambda *a: fn(*a)).lower(*args).compile()


def compile_without_loops(fn: Callable, *args) -> Any:
    """:func:`compile_in_modes` with the CP convs' per-sample, chunk and tile loops and the
    dense convs' chunks (since stop 69) off (as on GPU/TPU, where the automatic rules leave them off)."""
    return compile_in_modes(fn, *args, per_sample=False, tile_rows=0, dense_chunks=False)


def flops_of(compiled: Any) -> float | None:
    """``cost_analysis()["flops"]`` of a compiled program (None if unavailable)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def xla_flops(fn: Callable, *args) -> float | None:
    """:func:`flops_of` ``jax.jit(fn)`` on ``args``, compiled without the loops
    (:func:`compile_without_loops`): XLA counts a loop body once, not once per sample or tile."""
    return flops_of(compile_without_loops(fn, *args))


def memory_mib(compiled: Any) -> dict[str, float] | None:
    """``memory_analysis()`` of a compiled program in MiB: ``temp`` (its temporary buffers: the
    activations and intermediates of a train step; on CPU one block allocated per call),
    ``argument`` and ``output``; None where the backend gives none."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return {k: round(getattr(m, f"{k}_size_in_bytes") / 2**20, 1) for k in ("temp", "argument", "output")}


def compile_program(fn: Callable, *args) -> tuple[Any, float]:
    """``(compiled, compile_s)``: ``jax.jit(fn)`` compiled for ``args``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def compile_jax(fn: Callable, *args) -> tuple[Callable[[], Any], float]:
    """``(call, compile_s)``: ``call()`` runs the compiled ``jax.jit(fn)(*args)`` to completion."""
    compiled, compile_s = compile_program(fn, *args)
    return (lambda: jax.block_until_ready(compiled(*args))), compile_s


def program_text(fn: Callable, *args) -> str:
    """StableHLO of ``jax.jit(fn)`` on ``args`` without the module name: equal texts = one program."""
    return re.sub(r"^module @\S+", "module", jax.jit(fn).lower(*args).as_text(), count=1)


MIN_ROUNDS = 9  # rounds every case gets (fewer only if --repeats asks for fewer), whatever its budget
MAX_ROUNDS = 15  # the default --repeats
CONV_BUDGET_S, STEP_BUDGET_S = 40.0, 64.0  # seconds of timed calls per conv case / train-step pair


def minor_faults(pid: int) -> int | None:
    """Minor page faults of process ``pid`` so far (all its threads; ``/proc/<pid>/stat``'s 10th
    field), or ``None`` where there is no ``/proc``. A fault is a first touch of a page the process
    mapped: each call of a program whose large buffers the allocator maps afresh faults them in
    again (glibc's defaults: every buffer from 16 MB up in ``python -m benchmarks.experiments
    page_faults``; with ``MALLOC_MMAP_MAX_=0`` still every buffer of 64 MiB or more that a thread
    other than the main one allocates)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return None


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int, budget_s: float,
                     probe: Callable[[], float | None] | None = None) -> dict[str, dict]:
    """Warms up every zero-argument ``call`` once, then times them in interleaved rounds, in a new
    random order each round.

    Rounds stop after ``repeats`` or once ``budget_s`` seconds of timed calls are spent
    (at least ``MIN_ROUNDS`` rounds unless ``repeats`` is smaller). Returns
    ``{name: {"median_ms", "times_ms", "minor_faults"}}``, with ``"roundtrip_ns"`` (``probe()`` at
    the start of each round, :class:`benchmarks.placement.CrossCoreProbe`) if ``probe`` is given.
    ``minor_faults``: the median over the rounds of the minor page faults during one call
    (:func:`minor_faults`, read outside the timed interval) of the process that runs it, this one
    or, for a call with a ``pid`` attribute (the peers' :class:`benchmarks.peers.PeerProcess`), that
    process; ``None`` without ``/proc``.
    """
    for call in calls.values():
        call()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in calls}
    faults: dict[str, list[int | None]] = {name: [] for name in calls}
    pids = {name: getattr(call, "pid", os.getpid()) for name, call in calls.items()}
    spent, names, roundtrip = 0.0, list(calls), []
    order = np.random.default_rng(0)
    for rnd in range(repeats):
        if probe is not None:
            roundtrip.append(probe())
        # a new random order each round, so no path always runs right after the same other one
        # (a path timed after one with large buffers reads systematically slower)
        for name in map(str, order.permutation(names)):
            f0 = minor_faults(pids[name])
            t0 = time.perf_counter()
            calls[name]()
            dt = time.perf_counter() - t0
            f1 = minor_faults(pids[name])
            times[name].append(1e3 * dt)
            faults[name].append(None if f0 is None or f1 is None else f1 - f0)
            spent += dt
        if rnd + 1 >= min(MIN_ROUNDS, repeats) and spent > budget_s:
            break
    extra = {"roundtrip_ns": [v if v is None else round(v, 1) for v in roundtrip]} if probe is not None else {}
    return {name: {"median_ms": statistics.median(t), "times_ms": [round(v, 2) for v in t],
                   "minor_faults": None if None in faults[name] else int(statistics.median(faults[name]))} | extra
            for name, t in times.items()}


def _normal(rng: np.random.Generator, shape, std: float) -> jax.Array:
    return jnp.asarray(rng.normal(0.0, std, size=shape), jnp.float32)


def make_inputs(case: ConvCase, seed: int = 0):
    """``x``, a dense kernel and CP params of the case, O(1)-scaled (no denormals/overflow)."""
    rng = np.random.default_rng(seed)
    x = _normal(rng, (case.batch, *case.in_sizes, case.c_in), 1.0)
    fan_in = case.c_in * int(np.prod(case.kernel))
    kernel = _normal(rng, (*case.kernel, case.c_in, case.c_out), fan_in ** -0.5)
    params = {
        "lambda": jnp.ones((case.rank,), jnp.float32),
        "factor_in": _normal(rng, (case.c_in, case.rank), case.c_in ** -0.5),
        "factor_out": _normal(rng, (case.c_out, case.rank), case.rank ** -0.5),
    }
    for m, k in zip(case.modes, case.kernel):
        params[conv.mode_key(m)] = _normal(rng, (k, case.rank), k ** -0.5)
    return x, kernel, params


def conv_fns(case: ConvCase) -> dict[str, Callable]:
    """Forward functions ``f(x, w)`` of the four paths and of ``dense patches`` (``w`` = dense
    kernel or CP params)."""
    st, pad, modes = case.stride, case.padding, case.modes
    strides, pads = case.geometry()

    def dense(x, k):
        return lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=conv_ops.channels_last_dims(len(strides)))

    def cp(impl):
        return lambda x, p: conv.cp_conv(x, p, modes=modes, stride=st, padding=pad, implementation=impl,
                                         input_grad=case.input_grad)

    return ({"dense": dense, DENSE_PATCHES: lambda x, k: patches.dense_patches(x, k, strides, pads)}
            | {impl: cp(impl) for impl in CP_PATHS})


def fwd_bwd(fn: Callable, input_grad: bool) -> Callable:
    """``(x, w, cot) ->`` ``value_and_grad`` of ``sum(fn(x, w) * cot)`` w.r.t. ``w`` and, if
    ``input_grad``, ``x``: the backward pass starts from the cotangent ``cot``, as a layer's does
    from the next layer's gradient in a train step."""
    return jax.value_and_grad(lambda x, w, cot: jnp.sum(fn(x, w) * cot), argnums=(0, 1) if input_grad else 1)


def cotangent(fn: Callable, x: jax.Array, w: Any) -> jax.Array:
    """A fixed random (seeded, float32) array of ``fn(x, w)``'s shape, the ``cot`` of :func:`fwd_bwd`.

    Not the all-ones cotangent of a ``sum()`` loss, which no train step gets: XLA exploits it (it
    hoisted the product of the cotangent with the factorized path's output factor out of the
    per-sample loop)."""
    shape = jax.eval_shape(fn, x, w).shape
    return jnp.asarray(np.random.default_rng(1).standard_normal(shape, dtype=np.float32))


def compile_fwd_bwd(fn: Callable, x: jax.Array, w: Any, input_grad: bool, cot: jax.Array):
    """``compile_jax`` of :func:`fwd_bwd` on ``(x, w, cot)``; ``cot`` from :func:`cotangent`, made
    once per layer and shared by its paths (they all have the same output shape)."""
    return compile_jax(fwd_bwd(fn, input_grad), x, w, cot)


def case_compiler(case: ConvCase) -> tuple[jax.Array, dict, Callable]:
    """``(kernel, params, compile)``: ``case``'s fixed weights (:func:`make_inputs`) and
    ``compile(fn, w) -> (call, compile_s)``, :func:`compile_fwd_bwd` of ``fn(x, w)`` on the case's
    fixed input ``x`` with the cotangent every path of the case shares (:func:`cotangent`), for
    the experiments."""
    x, kernel, params = make_inputs(case)
    cot = cotangent(conv_fns(case)["dense"], x, kernel)
    return kernel, params, lambda fn, w: compile_fwd_bwd(fn, x, w, case.input_grad, cot)


def case_shape(case: ConvCase) -> dict[str, Any]:
    """The JSON record of ``case``'s geometry (resolved strides and paddings)."""
    strides, pads = case.geometry()
    return {"batch": case.batch, "in_sizes": list(case.in_sizes), "c_in": case.c_in, "c_out": case.c_out,
            "kernel": list(case.kernel), "rank": case.rank, "stride": list(strides),
            "padding": [list(p) for p in pads], "modes": list(case.modes)}


def analytic(case: ConvCase) -> dict[str, Any]:
    strides, pads = case.geometry()
    order = conv.best_mode_order(case.in_sizes, case.kernel, strides, pads, (1,) * len(case.kernel))
    kw = dict(stride=strides, padding=pads)
    dense = case.batch * counting.dense_flops(case.in_sizes, case.c_in, case.c_out, case.kernel, **kw)
    fact = case.batch * counting.cp_flops(case.in_sizes, case.c_in, case.c_out, case.kernel, case.rank, order=order, **kw)
    recon = dense + counting.cp_reconstruct_flops(case.c_in, case.c_out, case.kernel, case.rank)
    costs = counting.cp_path_costs(case.batch, case.in_sizes, case.c_in, case.c_out, case.kernel, case.rank, order=order, **kw)
    return {
        "flops": {"dense": dense, "factorized": fact, "reconstructed": recon},
        "cost_model": {"factorized": costs["factorized"], "reconstructed": costs["reconstructed"]},
        "mode_order": [case.modes[i] for i in order],
        "params": {"dense": counting.dense_params(case.c_in, case.c_out, case.kernel),
                   "cp": counting.cp_params(case.c_in, case.c_out, case.kernel, case.rank)},
    }


def run_conv_case(case: ConvCase, repeats: int, budget_s: float, peer_proc: peers.PeerProcess | None,
                  probe: Callable[[], float | None] | None = None) -> dict[str, Any]:
    """Times every path of ``case`` and, with ``peer_proc``, the peers (in their own process), interleaved
    (with ``probe``, the cross-core round trip before each round: :func:`time_interleaved`)."""
    with_peers = peer_proc is not None
    x, kernel, params = make_inputs(case)
    fns = conv_fns(case)
    weights = {p: (kernel if p in ("dense", DENSE_PATCHES) else params) for p in fns}
    check_same_conv(case.name, fns["dense"], fns[DENSE_PATCHES], x, kernel)
    strides, pads = case.geometry()
    choice = autotune.choose_cp(x.shape, x.dtype, params, case.modes, strides, pads, (1,) * len(strides),
                                case.input_grad)
    measured = measured_pick(case, x, params) if autotune.policy() == "analytic" else {"pick": choice, "ms": None}
    # ``auto`` traces to the program of the path it picks; that program is timed once, under its
    # path's name (timing it twice would only measure the spread between identical calls).
    cot = cotangent(fns["dense"], x, kernel)  # every path has the dense conv's output shape
    same = program_text(fwd_bwd(fns["auto"], case.input_grad), x, params, cot) == program_text(
        fwd_bwd(fns[choice], case.input_grad), x, params, cot)
    calls, compile_s = {}, {}
    for p in fns:
        if not (p == "auto" and same):
            calls[p], compile_s[p] = compile_fwd_bwd(fns[p], x, weights[p], case.input_grad, cot)
    if with_peers:
        calls |= peer_proc.conv_peers(case)
    timing = time_interleaved(calls, repeats, budget_s, probe)
    if same:
        timing["auto"] = timing[choice]
    ana = analytic(case)
    xla = {p: xla_flops(fns[p], x, weights[p]) for p in ("dense", "factorized", "reconstructed")}
    ms = {p: timing[p]["median_ms"] for p in PATHS} | {p: timing[p]["median_ms"] for p in calls}
    best = min(ms["factorized"], ms["reconstructed"])
    measured["ratio to best"] = ms[measured["pick"]] / best
    return {
        "group": case.group,
        "name": case.name,
        "shape": case_shape(case),
        "ms": ms,
        "input_grad": case.input_grad,
        "times_ms": {p: timing[p]["times_ms"] for p in calls},
        "minor_faults": {p: timing[p]["minor_faults"] for p in (*PATHS, *calls)},
        "roundtrip_ns": timing[next(iter(calls))].get("roundtrip_ns"),
        "compile_s": {p: round(v, 3) for p, v in compile_s.items()},
        "auto_choice": choice,
        "auto_same_program_as_choice": same,
        "measured_best": "factorized" if ms["factorized"] <= ms["reconstructed"] else "reconstructed",
        "measured_autotune": measured,
        "ratios": {
            "factorized/dense": ms["factorized"] / ms["dense"],
            "reconstructed/dense": ms["reconstructed"] / ms["dense"],
            "auto/dense": ms["auto"] / ms["dense"],
            "auto/best": ms["auto"] / best,
        } | dense_ratios(ms) | (peer_ratios(ms) if with_peers else {}),
        "xla_flops_fwd": xla,
        "analytic_flops_fwd": ana["flops"],
        "xla/analytic": {p: (xla[p] / ana["flops"][p] if xla[p] else None) for p in xla},
        "cost_model": ana["cost_model"],
        "mode_order": ana["mode_order"],
        "params": ana["params"],
    }


def measured_pick(case: ConvCase, x: jax.Array, params: dict) -> dict[str, Any]:
    """What ``implementation="auto"`` would pick on this machine under the measured policy
    (``HOCP_JAX_AUTOTUNE=measure``): :func:`hocp_jax.autotune.measure`'s own timing of both paths
    (its rounds, before and apart from this benchmark's), ``{"pick": path, "ms": {path: median}}``."""
    strides, pads = case.geometry()
    times = autotune.measure(x.shape, x.dtype, params, case.modes, strides, pads, (1,) * len(strides), case.input_grad)
    return {"pick": min(times, key=times.get), "ms": {k: v * 1e3 for k, v in times.items()}}


def reduced_precision() -> bool:
    """Whether float32 matrix products and convs may round their operands (JAX's default on GPU,
    TensorFloat-32, and TPU, bfloat16): the program checks below then allow that rounding."""
    return jax.default_backend() != "cpu" and str(jax.config.jax_default_matmul_precision).lower() not in (
        "highest", "float32", "f32_f32_f32")


def check_same_conv(name: str, dense: Callable, other: Callable, x: jax.Array, kernel: jax.Array) -> None:
    """Raises ``AssertionError`` unless ``other(x, kernel)`` (a second dense program) computes the
    forward of ``dense(x, kernel)`` to float32 accuracy (to 1 % of the output's range where
    :func:`reduced_precision`)."""
    want, got = (np.asarray(jax.jit(f)(x, kernel)) for f in (dense, other))
    err = float(np.max(np.abs(got - want)))
    if not err <= (1e-2 if reduced_precision() else 1e-4) * max(float(np.max(np.abs(want))), 1.0):
        raise AssertionError(f"{name}: the patches program differs from lax's conv by {err}")


def dense_ratios(ms: dict[str, float], faster_dense: float | None = None) -> dict[str, float]:
    """hocp-jax auto vs the second JAX dense program and vs the faster of the two dense programs
    (``faster_dense``, by default the faster of ``ms``'s two)."""
    faster = faster_dense or min(ms["dense"], ms[DENSE_PATCHES])
    return {f"auto/{DENSE_PATCHES}": ms["auto"] / ms[DENSE_PATCHES], "auto/faster dense": ms["auto"] / faster,
            f"{DENSE_PATCHES}/dense": ms[DENSE_PATCHES] / ms["dense"]}


def peer_ratios(ms: dict[str, float], tl_best: float | None = None) -> dict[str, float]:
    """hocp-jax auto vs the peers (same shapes, same protocol). ``tl_best``: TensorLy-Torch's best
    CP path (by default the faster of ``ms``'s two; a stack passes the sum of each layer's
    faster one, as a user picks TensorLy-Torch's ``implementation`` per layer and ``auto`` picks per layer)."""
    tl_best = tl_best or min(ms["tltorch cp reconstructed"], ms["tltorch cp factorized"])
    return {"auto/torch dense": ms["auto"] / ms["torch dense"], "auto/tltorch best": ms["auto"] / tl_best,
            "dense/torch dense": ms["dense"] / ms["torch dense"]}


TLTORCH_PATHS = ("tltorch cp reconstructed", "tltorch cp factorized")


def _faster(row: dict, a: str, b: str) -> str:
    """Which of a layer's programs ``a`` and ``b`` has the lower median (``a`` on a tie)."""
    return a if row["ms"][a] <= row["ms"][b] else b


def _auto_path(row: dict) -> str:
    """The layer's timed program that ``auto`` ran (timed once under its path's name when it is the same program)."""
    return "auto" if "auto" in row["times_ms"] else row["auto_choice"]


def stack_rounds(rows: list[dict]) -> dict[str, dict[str, float]]:
    """The stack's ratios round by round: round ``i`` adds up each layer's ``i``-th reading (its
    rounds interleave all its paths and peers, so a ratio within a layer's round compares calls
    made side by side), over the rounds every layer has. Per layer, ``auto`` is the path it picked
    and "faster dense" / "tltorch best" the program faster in the medians, as in
    :func:`stack_total`. ``{ratio: {"median", "min", "max", "rounds"}}``; empty without times."""
    if not all("times_ms" in r for r in rows):
        return {}
    sel = {"auto": _auto_path, "dense": lambda r: "dense",
           "faster dense": lambda r: _faster(r, "dense", DENSE_PATCHES)}
    if all("torch dense" in r["times_ms"] for r in rows):
        sel |= {"torch dense": lambda r: "torch dense",
                "tltorch best": lambda r: _faster(r, *TLTORCH_PATHS)}
    n = min(len(r["times_ms"][sel["auto"](r)]) for r in rows)
    totals = {k: np.sum([r["times_ms"][f(r)][:n] for r in rows], axis=0) for k, f in sel.items()}
    out = {}
    for k in sel:
        if k != "auto":
            q = totals["auto"] / totals[k]
            out[f"auto/{k}"] = {"median": float(np.median(q)), "min": float(q.min()), "max": float(q.max()), "rounds": n}
    return out


def stack_total(rows: list[dict]) -> dict[str, Any]:
    names = [p for p in rows[0]["ms"] if all(p in r["ms"] for r in rows)]
    ms = {p: sum(r["ms"][p] for r in rows) for p in names}
    oracle = sum(min(r["ms"]["factorized"], r["ms"]["reconstructed"]) for r in rows)
    faster_dense = sum(r["ms"][_faster(r, "dense", DENSE_PATCHES)] for r in rows)
    peers_in = "torch dense" in ms
    tl_best = sum(r["ms"][_faster(r, *TLTORCH_PATHS)] for r in rows) if peers_in else None
    flops = {p: sum(r["analytic_flops_fwd"][p] for r in rows) for p in ("dense", "factorized", "reconstructed")}
    xla = {p: sum(r["xla_flops_fwd"][p] or 0.0 for r in rows) for p in flops}
    return {
        "ms": ms,
        "per_layer_best_ms": oracle,
        "per_layer_faster_dense_ms": faster_dense,
        "per_layer_tltorch_best_ms": tl_best,
        "ratios": {
            "factorized/dense": ms["factorized"] / ms["dense"],
            "reconstructed/dense": ms["reconstructed"] / ms["dense"],
            "auto/dense": ms["auto"] / ms["dense"],
            "auto/best": ms["auto"] / min(ms["factorized"], ms["reconstructed"]),
            "auto/per_layer_best": ms["auto"] / oracle,
        } | dense_ratios(ms, faster_dense) | (peer_ratios(ms, tl_best) if peers_in else {}),
        "per_round_ratios": stack_rounds(rows),
        "analytic_flops_fwd": flops,
        "xla_flops_fwd": xla,
        "xla/analytic": {p: xla[p] / flops[p] for p in flops},
        "params": {"dense": sum(r["params"]["dense"] for r in rows), "cp": sum(r["params"]["cp"] for r in rows)},
    }


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A whole-model train step: ``get_model(model, tiny=tiny)`` on ``input_shape``."""

    name: str
    model: str
    input_shape: tuple[int, ...]
    tiny: bool = False
    transduce_from: tuple[int, ...] | None = None  # static input shape to init on, then transduce
    target: str = "va"
    reference: str | None = None  # name of the case this one is compared with (ratio column)


def model_cases(quick: bool) -> list[ModelCase]:
    """Full-width models at reduced sizes: ResNet-18 at 112x112 (8 images vs one 8-frame clip),
    Jester nets at 18x84x84 with batch 2. Quick: ``tiny=True`` models on 32x32 inputs."""
    if quick:
        img, clip, jester, tiny = (4, 32, 32, 3), (1, 4, 32, 32, 3), (2, 16, 32, 32, 3), True
    else:
        img, clip, jester, tiny = (8, 112, 112, 3), (1, 8, 112, 112, 3), (2, 18, 84, 84, 3), False
    static, dense2d, dense3d = "resnet18_hocp static", "resnet18 dense 2-D", "resnet18_3d dense"
    return [
        ModelCase(dense2d, "resnet18", img, tiny),
        ModelCase(static, "resnet18_hocp", img, tiny, reference=dense2d),
        ModelCase(dense3d, "resnet18_3d", clip, tiny),
        ModelCase("resnet18_hocp transduced", "resnet18_hocp", clip, tiny, transduce_from=img, reference=dense3d),
        ModelCase("jester dense", "jester", jester, tiny, target="logits"),
        ModelCase("jester_hocp", "jester_hocp", jester, tiny, target="logits", reference="jester dense"),
    ]


def _loss_fn(target: str):
    def loss_fn(outputs, batch, key):
        del key
        if target == "logits":
            logp = jax.nn.log_softmax(outputs["logits"])
            loss = -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], axis=-1))
        else:
            loss = jnp.mean((outputs["va"] - batch["va"]) ** 2)
        return loss, {}

    return loss_fn


def model_step(case: ModelCase, model: Any = None) -> tuple[Callable, Any, dict[str, jax.Array]]:
    """``(train_step, state, batch)``: the SGD-momentum train step of ``case`` (of ``model``, a
    Flax module to use instead of ``case.model``'s), its step-0 state and a fixed random batch."""
    import optax

    from hocp_jax import transduction
    from hocp_jax.models import get_model
    from hocp_jax.training import TrainState, make_train_step

    if model is None:
        kwargs = {"head": {"n_outputs": 0, "n_classes": 27}} if case.target == "logits" else {}
        model = get_model(case.model, tiny=case.tiny, **kwargs)
    key = jax.random.key(0)
    init_shape = case.transduce_from or case.input_shape
    variables = dict(jax.jit(lambda k: model.init(k, jnp.zeros(init_shape), train=False))(key))
    if case.transduce_from is not None:
        variables["params"] = transduction.transduce(variables["params"], {"t": 3}, init="delta", dense="keep")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=case.input_shape), jnp.float32)
    b = case.input_shape[0]
    if case.target == "logits":
        batch = {"video": x, "label": jnp.asarray(rng.integers(0, 27, size=(b,)), jnp.int32)}
    else:
        out_shape = (b, case.input_shape[1], 2) if len(case.input_shape) == 5 else (b, 2)
        batch = {("video" if len(case.input_shape) == 5 else "image"): x,
                 "va": jnp.asarray(rng.uniform(-1, 1, size=out_shape), jnp.float32)}
    tx = optax.sgd(1e-3, momentum=0.9)
    return make_train_step(model, _loss_fn(case.target), tx), TrainState.create(variables, tx, key), batch


def prepare_model_case(case: ModelCase) -> tuple[Callable[[], Any], dict[str, Any]]:
    """``(call, row)``: a compiled train step of ``case`` and its result row without timings."""
    from hocp_jax.models import count_params

    step, state, batch = model_step(case)
    compiled, compile_s = compile_program(step, state, batch)
    without_loops = compile_without_loops(step, state, batch)
    return (lambda: jax.block_until_ready(compiled(state, batch))), {
        "name": case.name,
        "model": case.model,
        "input_shape": list(case.input_shape),
        "tiny": case.tiny,
        "transduced": case.transduce_from is not None,
        "reference": case.reference,
        "params": count_params(state.params),
        "compile_s": round(compile_s, 3),
        "xla_flops_step": flops_of(without_loops),
        "memory_mib": memory_mib(compiled),
        "memory_mib_without_loops": memory_mib(without_loops),
    }


def patches_name(name: str) -> str:
    """The row name of model ``name``'s train step with its dense convs as patches matrix products."""
    return f"{name} (patches)"


def prepare_patches_case(case: ModelCase, lax_call: Callable[[], Any]) -> tuple[Callable[[], Any], dict[str, Any]] | None:
    """``prepare_model_case`` of ``case`` compiled with every dense conv as a patches matrix product
    (:func:`benchmarks.patches.patches_convs`), its loss and gradient norm checked against
    ``lax_call``'s (the same step with ``lax``'s convs); ``None`` if the model has no such conv."""
    with patches.patches_convs() as replaced:
        call, row = prepare_model_case(case)
    if not replaced:
        return None
    check_same_step(case.name, call()[1], lax_call()[1], "the patches program", "lax's")
    ref = case.reference and patches_name(case.reference)
    return call, row | {"name": patches_name(case.name), "reference": ref, "convs_as_patches": len(replaced)}


def check_same_step(name: str, got: dict, want: dict, got_what: str, want_what: str) -> None:
    """Raises ``AssertionError`` unless the metrics ``got`` of one program of a train step (e.g.
    its patches program) match ``want``, another program's of the same step (e.g. its ``lax``
    program's): the loss to float32, the gradient norm to float32 noise through the backward pass
    (both to 2 % where :func:`reduced_precision`)."""
    for k in want:
        rel = 2e-2 if reduced_precision() else (1e-3 if k == "grad_norm" else 1e-5)
        if abs(float(got[k]) - float(want[k])) > rel * abs(float(want[k])) + 1e-6:
            raise AssertionError(f"{name}: {got_what}'s {k} {float(got[k])} differs from {want_what} {float(want[k])}")


def other_policy() -> str:
    """The ``auto`` policy not in force (:func:`hocp_jax.autotune.policy`)."""
    return "analytic" if autotune.policy() == "measure" else "measure"


def policy_name(name: str, policy: str) -> str:
    """The row name of model ``name``'s train step compiled under the ``auto`` policy ``policy``."""
    return f"{name} ({policy} picks)"


@contextlib.contextmanager
def recording_picks():
    """Within the block, every ``implementation="auto"`` pick traced (``[x shape, output channels,
    strides, path]``) and every kernel-gradient pick of a 2-D conv of a rebuilt kernel (``[x shape,
    kernel shape, "products" or "xla"]``) is appended to the yielded ``{"cp": [...],
    "kernel_grad": [...]}``; not the picks made inside another pick (the measured policy's timed
    programs)."""
    made: dict[str, list] = {"cp": [], "kernel_grad": []}
    choose, choose_grad = autotune.choose_cp, autotune.choose_kernel_grad
    depth = [0]

    def recorded(kind, pick_fn, describe, label=lambda value: value):
        def pick(*args, **kwargs):  # returns what pick_fn returns: the program must not change
            depth[0] += 1
            try:
                value = pick_fn(*args, **kwargs)
            finally:
                depth[0] -= 1
            if not depth[0]:
                made[kind].append(describe(*args, **kwargs) + [label(value)])
            return value

        return pick

    autotune.choose_cp = recorded("cp", choose, lambda x_shape, dtype, params, modes, strides, *a, **k: [
        list(x_shape), int(params["factor_out"].shape[0]), list(strides)])
    autotune.choose_kernel_grad = recorded(
        "kernel_grad", choose_grad, lambda x_shape, dtype, kernel_shape, *a, **k: [list(x_shape), list(kernel_shape)],
        label=lambda products: "products" if products else "xla")
    try:
        yield made
    finally:
        autotune.choose_cp, autotune.choose_kernel_grad = choose, choose_grad


def picks_that_differ(a: dict[str, list], b: dict[str, list]) -> list[list]:
    """The convs of two :func:`recording_picks` records of one step whose picks differ, in order of
    first appearance: their description, then the picks each record made for them (``"a/b"`` if
    its traces of that conv picked both, ``"-"`` if it traced none, e.g. the kernel gradient of
    a conv the other record ran factorized)."""
    out = []
    for kind in ("cp", "kernel_grad"):
        seen: dict[str, list] = {}
        picks: list[dict[str, set]] = [{}, {}]
        for i, record in enumerate((a, b)):
            for entry in record[kind]:
                key = json.dumps(entry[:-1])
                seen.setdefault(key, entry[:-1])
                picks[i].setdefault(key, set()).add(entry[-1])
        for key, what in seen.items():
            mine, theirs = ("/".join(sorted(p.get(key, ()))) or "-" for p in picks)
            if mine != theirs:
                out.append(what + [mine, theirs])
    return out


def prepare_policy_case(case: ModelCase) -> dict[str, tuple[Callable[[], Any], dict[str, Any]]]:
    """``prepare_model_case`` of ``case`` (a model with CP convs) under the policy in force and
    under the other ``auto`` policy (:func:`other_policy`; measured picks are timed while a step is
    traced, as in a user's first step), keyed by row name; the second's loss and gradient norm
    checked against the first's, and its row lists the picks that differ between the two
    (:func:`picks_that_differ`; every pick of each trace of preparing the step: the model's init,
    a transduced model's 2-D source, the step)."""
    policy = other_policy()
    with recording_picks() as mine:
        call, row = prepare_model_case(case)
    with autotune.policy_mode(policy), recording_picks() as theirs:
        other, other_row = prepare_model_case(case)
    check_same_step(case.name, other()[1], call()[1], f"the {policy} picks' program", "the other's")
    other_row |= {"name": policy_name(case.name, policy), "policy": policy, "picks_traced": len(theirs["cp"]),
                  "picks_that_differ": picks_that_differ(mine, theirs)}
    return {case.name: (call, row), other_row["name"]: (other, other_row)}


def run_model_pair(cases: list[ModelCase], repeats: int, budget_s: float, with_patches: bool = True,
                   with_policies: bool = False, probe: Callable[[], float | None] | None = None) -> list[dict[str, Any]]:
    """Train steps of ``cases`` (a model and its reference), each also (if ``with_patches``) with
    its dense convs as patches matrix products where it has any (:func:`prepare_patches_case`),
    and each model with a reference also (if ``with_policies``) under the other ``auto`` policy
    (:func:`prepare_policy_case`), timed interleaved in the same rounds."""
    prepared = {}
    for c in cases:
        if with_policies and c.reference is not None:
            prepared |= prepare_policy_case(c)
        else:
            prepared[c.name] = prepare_model_case(c)
        patched = prepare_patches_case(c, prepared[c.name][0]) if with_patches else None
        if patched:
            prepared[patches_name(c.name)] = patched
    timing = time_interleaved({name: call for name, (call, _) in prepared.items()}, repeats, budget_s, probe)
    return [row | {"ms": timing[name]["median_ms"], "times_ms": timing[name]["times_ms"],
                   "minor_faults": timing[name]["minor_faults"],
                   "roundtrip_ns": timing[name].get("roundtrip_ns")} for name, (_, row) in prepared.items()]


# ----------------------------------------------------------------------------- report


def _f(v, nd=2):
    return "n/a" if v is None else f"{v:.{nd}f}"


def conv_table(rows: list[dict], total: dict | None) -> list[str]:
    lines = [
        "| layer | dense ms | dense patches ms | factorized ms | reconstructed ms | auto ms (pick) | fact/dense "
        "| recon/dense | auto/best | auto/faster dense | XLA/analytic FLOPs dense, fact, recon |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ms, ra, xa = r["ms"], r["ratios"], r["xla/analytic"]
        pick = r["auto_choice"][:5] + ("" if r["auto_choice"] == r["measured_best"] else " ✗")
        lines.append(
            f"| {r['name']} (B={r['shape']['batch']}, R={r['shape']['rank']}) | {ms['dense']:.1f} "
            f"| {ms[DENSE_PATCHES]:.1f} | {ms['factorized']:.1f} | {ms['reconstructed']:.1f} | {ms['auto']:.1f} ({pick}) "
            f"| {ra['factorized/dense']:.2f} | {ra['reconstructed/dense']:.2f} | {ra['auto/best']:.2f} "
            f"| {ra['auto/faster dense']:.2f} | {_f(xa['dense'])}, {_f(xa['factorized'])}, {_f(xa['reconstructed'])} |"
        )
    if total:
        ms, ra, xa = total["ms"], total["ratios"], total["xla/analytic"]
        lines.append(
            f"| **stack total** | **{ms['dense']:.1f}** | **{ms[DENSE_PATCHES]:.1f}** | **{ms['factorized']:.1f}** "
            f"| **{ms['reconstructed']:.1f}** | **{ms['auto']:.1f}** | **{ra['factorized/dense']:.2f}** "
            f"| **{ra['reconstructed/dense']:.2f}** | **{ra['auto/best']:.2f}** | **{ra['auto/faster dense']:.2f}** "
            f"| {_f(xa['dense'])}, {_f(xa['factorized'])}, {_f(xa['reconstructed'])} |"
        )
    return lines


def model_table(rows: list[dict]) -> list[str]:
    by_name = {r["name"]: r for r in rows}
    lines = ["| train step | input | params | ms / step | vs | time ratio | per-round ratios: median (min-max), rounds "
             "| XLA GFLOPs / step |",
             "|---|---|---:|---:|---|---:|---|---:|"]
    for r in rows:
        gf = r["xla_flops_step"] / 1e9 if r["xla_flops_step"] else None
        ref = by_name.get(r["reference"])
        ratio = f"{r['ms'] / ref['ms']:.2f}" if ref else ""
        spread = ""
        if ref:
            q = round_ratios(r, ref)
            spread = f"{np.median(q):.2f} ({min(q):.2f}-{max(q):.2f}), {len(q)}"
        lines.append(f"| {r['name']} | {'x'.join(map(str, r['input_shape']))} | {r['params']:,} | {r['ms']:.1f} "
                     f"| {r['reference'] or ''} | {ratio} | {spread} | {_f(gf, 1)} |")
    return lines


def round_ratios(row: dict, ref: dict) -> list[float]:
    """``row``'s time over ``ref``'s in each round they were timed together (same round index)."""
    return [a / b for a, b in zip(row["times_ms"], ref["times_ms"])]


def peer_table(rows: list[dict], total: dict | None) -> list[str]:
    cols = ["dense", DENSE_PATCHES] + list(PATHS[1:]) + list(peers.PEERS)
    ratios = ["auto/dense", "auto/faster dense", "auto/torch dense", "auto/tltorch best"]
    lines = ["| layer | dx | JAX dense | JAX dense patches | hocp fact | hocp recon | hocp auto | torch dense "
             "| tltorch CP recon | tltorch CP fact | auto/JAX dense | auto/faster JAX dense | auto/torch dense "
             "| auto/tltorch best |",
             "|---|---|" + "---:|" * (len(cols) + len(ratios))]
    for r, bold in [(r, False) for r in rows] + ([(total, True)] if total else []):
        ms, ra = r["ms"], r["ratios"]
        cells = [f"{ms[c]:.1f}" for c in cols] + [f"{ra[k]:.2f}" for k in ratios]
        if bold:
            lines.append("| **stack total** | | " + " | ".join(f"**{c}**" for c in cells) + " |")
        else:
            lines.append(f"| {r['name']} | {'yes' if r['input_grad'] else 'no'} | " + " | ".join(cells) + " |")
    return lines


def fault_lines(results: dict) -> list[str]:
    """The minor page faults per call (thousands, medians over the rounds; ``time_interleaved``)
    of every layer's programs and peers and of every train step, where the run counted them."""
    rows = [r for rows in results["conv"].values() for r in rows
            if any(v is not None for v in r.get("minor_faults", {}).values())]
    steps = [r for r in results["models"] if r.get("minor_faults") is not None]
    if not rows and not steps:
        return []

    def k(v: int | None) -> str:
        return "" if v is None else f"{v / 1e3:.1f}"

    cols = [c for c in ["dense", DENSE_PATCHES, *CP_PATHS, *peers.PEERS] if any(c in r["times_ms"] for r in rows)]
    out = ["## Page faults per call", "",
           "Minor page faults during one call, thousands (a fault maps one 4 KiB page: a first touch of memory the "
           "process's allocator mapped afresh), medians over the rounds, counted from `/proc/<pid>/stat` of the "
           "process that ran the call (`benchmarks.bench.minor_faults`). With glibc's defaults a call's large buffers "
           "are mapped afresh and faulted in again on every call (every size from 16 MB up in `python -m "
           "benchmarks.experiments page_faults`), and with `MALLOC_MMAP_MAX_=0` still every buffer of 64 MiB or more "
           "that a thread other than the main one allocates (XLA CPU's runtime threads): time that the FLOPs do not "
           "explain (the log's \"memory allocator\" items).", ""]
    if rows:
        out += ["| layer | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        out += [f"| {r['name']} | " + " | ".join(k(r["minor_faults"].get(c)) for c in cols) + " |" for r in rows]
        out.append("")
    if steps:
        out += ["| train step | faults per step (thousands) |", "|---|---:|"]
        out += [f"| {r['name']} | {k(r['minor_faults'])} |" for r in steps]
        out.append("")
    return out


def memory_lines(results: dict) -> list[str]:
    """Each train step's memory (``memory_mib`` of its program as timed and of the same step
    compiled without the CP convs' loops, :func:`compile_without_loops`), where the run has it."""
    rows = [r for r in results["models"] if r.get("memory_mib")]
    if not rows:
        return []
    by_name = {r["name"]: r for r in rows}

    def temp(r: dict, key: str) -> float | None:
        return (r.get(key) or {}).get("temp")

    def ratio(r: dict, key: str) -> str:
        ref = by_name.get(r["reference"] or "")
        a, b = temp(r, key), ref and temp(ref, key)
        return f"{a / b:.2f}" if a and b else ""

    out = ["## Train-step memory", "",
           "XLA's `memory_analysis()` of each compiled train step, MiB: `temp`, its temporary buffers (the activations "
           "and intermediates kept for the backward pass and its working set; on CPU one block allocated per call), "
           "and `arguments` (parameters, optimizer state, batch); as timed above, and compiled with the CP convs' "
           "per-sample, chunk and tile loops off (`benchmarks.bench.compile_without_loops`), the program the automatic "
           "rules give on GPU/TPU, here from this backend's compiler (a GPU's buffer assignment differs). "
           "`/ reference`: temp over the reference step's.", "",
           "| train step | temp MiB | temp MiB, loops off | arguments MiB | temp / reference | loops off: temp / reference |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        off = temp(r, "memory_mib_without_loops")
        out.append(f"| {r['name']} | {temp(r, 'memory_mib'):.1f} | {'' if off is None else f'{off:.1f}'} "
                   f"| {r['memory_mib']['argument']:.1f} | {ratio(r, 'memory_mib')} | {ratio(r, 'memory_mib_without_loops')} |")
    return out + [""]


PROTOCOL = (
    "Protocol: one jitted call = forward, then the backward pass from a fixed random cotangent (the loss "
    "`sum(y * r)`; a `sum()` loss gives an all-ones cotangent that XLA exploits and no train step has), with "
    "gradients w.r.t. every weight and, for every layer but a "
    "network's first (column `dx`), w.r.t. its input, as in a training step: nobody differentiates w.r.t. "
    "the network's input images, so the first Jester layer (3->64) gets parameter gradients only. Times are "
    "medians of rounds in which all paths of a layer (and the peers) run interleaved, in a new random order each "
    f"round, in one process (at least {MIN_ROUNDS} rounds per layer, up to {MAX_ROUNDS} or until {CONV_BUDGET_S:.0f} s "
    "of timed calls); ratios between paths of a row are the meaningful figures on a shared machine. "
    "`auto (pick)`: the path `implementation='auto'` chose, ✗ if the other path measured faster; `auto` "
    "traces to the same program as the path it picks (checked on the lowered StableHLO), so that program is "
    "timed once and `auto` reports its time. `auto/best` = auto / min(factorized, reconstructed): 1.00 when "
    "the pick is the faster path. Before a layer is timed, `hocp_jax.autotune.measure` times both CP paths "
    "as the measured policy (`HOCP_JAX_AUTOTUNE=measure`) does, in its own rounds; its pick is scored with "
    "this benchmark's times (target lines). Two JAX dense programs: `dense` is `lax`'s convolution "
    "(`lax.conv_general_dilated`, what `flax.linen.Conv` runs), `dense patches` the same conv as one matrix "
    "product of its explicit patches (`benchmarks.patches.dense_patches`, checked against `lax`'s forward "
    "first), which runs faster on most of these layers on this CPU; `auto/faster dense` = auto / min(dense, "
    "dense patches) per layer (the stack: over the per-layer minima; likewise TensorLy-Torch's best CP path, the "
    "faster of its two per layer). FLOP columns: XLA `cost_analysis()` forward FLOPs / analytic forward "
    "count (`hocp_jax.counting`); XLA does not count padded taps of a dense conv, so small padded sizes read "
    "below 1 there. The CP paths run with `cp_conv`'s defaults: on a single CPU device the factorized path "
    "of a 3-D conv runs one sample at a time (`per_sample`, see `hocp_jax.conv_plans.per_sample_default`), and "
    f"without a strided mode a sample with an intermediate of {conv_plans.TILE_MIN_BYTES / 2**20:g} MiB or more in "
    "tiles of output rows, whatever the batch (`hocp_jax.conv_plans.tile_plan`); that of a 2-D conv whose "
    f"whole-batch intermediate is {conv_plans.CHUNK_MIN_BYTES / 2**20:g} MiB or more in chunks of samples "
    "(`hocp_jax.conv_plans.batch_chunk_default`); FLOPs are "
    "counted on the whole-batch program."
)


def _revision_text(m: dict) -> str:
    if not m.get("commit"):
        return ""  # runs before stop 48 did not record it, or not a git checkout
    return f" at commit {m['commit'][:7]}" + (" with uncommitted changes" if m.get("uncommitted_changes") else "")


def markdown(results: dict) -> str:
    m = results["machine"]
    load = ", ".join(f"{v:.1f}" for v in m["loadavg_at_start"] or ())
    load_end = ", ".join(f"{v:.1f}" for v in m.get("loadavg_at_end") or ())
    out = [
        "# hocp-jax benchmarks",
        "",
        f"Generated by `{' '.join(['python -m benchmarks.bench'] + results['argv'])}` on {m['date']}"
        f"{_revision_text(m)}: "
        f"{m['cpu_model'] or m['processor']} ({m['cpu_count']} cores visible, vector extensions "
        f"{' '.join(m.get('cpu_vector_flags') or ['unknown'])}"
        + (f", {m['l2_cache_bytes'] // 1024} KiB of L2 per core" if m.get("l2_cache_bytes") else "")
        + f", load average {load} at start, "
        f"{load_end} at end), {m['platform']} / {m['device_kind']}, jax {m['jax']}, float32, `auto` policy "
        f"`{results['autotune']}`. "
        + (f"Total run time {results['wall_s']:.0f} s." if "wall_s" in results else
           "**Partial:** the run was stopped before its end; below are the rows it had timed.")
        + (f" Every batch size is {results['batch_scale']} times the one the titles and rows below give "
           f"(`--batch-scale {results['batch_scale']}`)." if results.get("batch_scale", 1) != 1 else "")
        + (f" Ratios, totals and targets re-scored from the stored times by `{results['rescored']}`."
           if results.get("rescored") else ""),
        "",
        PROTOCOL,
        "",
    ]
    if results.get("peers"):
        where = (f"CPU, `torch.set_num_threads({m['torch_threads']})`" if m.get("torch_device", "cpu") == "cpu" else
                 f"{m['torch_device']}, TensorFloat-32 allowed in float32 matrix products "
                 f"{m.get('torch_matmul_tf32')} and convs {m.get('torch_cudnn_tf32')}, as JAX's default precision allows it")
        out += [f"Peers in the same run: PyTorch {m['torch']} ({where}, "
                f"channels-first) dense `Conv2d`/`Conv3d`, and TensorLy-Torch {m['tltorch']} "
                "`FactorizedConv(factorization='cp', implementation='reconstructed'|'factorized')` at the same rank, "
                "same shapes and the same gradient protocol, run in a process of their own (`benchmarks.peers.PeerProcess`, "
                "as in a user's program) and timed interleaved with the JAX paths, one call at a time.", ""]
    else:
        why = results.get("peers_skipped") or "the optional `bench` extra is not installed"
        out += [f"Peers (PyTorch, TensorLy-Torch) skipped: {why}.", ""]
    titles = {"jester": "Jester 3-D ConvNet layers (batch 8, 3x3x3, padding 1, rank 6 x C_in)",
              "resnet2d": "ResNet-18 3x3 layers, 2-D (batch 8, padding 1, rank at the dense parameter budget)",
              "resnet3d": "ResNet-18 3x3 layers transduced to 3-D (3x3x3, 8 frames, batch 2, same rank)"}
    if results["quick"]:
        titles = {g: f"{g} (--quick: shrunk shapes, see the rows)" for g in titles}
    for group, rows in results["conv"].items():
        out += [f"## {titles.get(group, group)}", ""]
        out += conv_table(rows, results["totals"].get(group))
        out.append("")
        if results.get("peers"):
            out += ["Side by side with the peers (ms):", ""]
            out += peer_table(rows, results["totals"].get(group))
            out.append("")
    if results["models"]:
        out += ["## Whole-model train steps (fwd + bwd + SGD-momentum update)", "",
                "The primary figures. Each model is timed interleaved with its reference in the same rounds; "
                "`time ratio` is the ratio of the medians (the figure the targets use), the next column the "
                "ratio within each round, median (min-max), and the number of rounds. "
                "Reduced sizes: ResNet-18 family at 112x112 (static: 8 images; video: one clip of 8 frames, "
                "the same number of frames), Jester nets at 18x84x84 with batch 2. The transduced model is the "
                "static HO-CP ResNet-18's parameters with a delta-initialised temporal factor (dense 1x1 shortcuts "
                "kept, applied per frame). The HO-CP ResNet-18 runs `implementation='auto'` "
                "(its default: reconstructed or factorized per layer and input shape; its stem is told it gets no "
                "input gradient); the Jester HO-CP net has psi between factors, which requires the factorized path. "
                "`<name> (patches)`: the same step compiled with every dense conv (`lax.conv_general_dilated` "
                "on channels-last, ungrouped, undilated inputs: the dense models' convs, the HO-CP models' "
                "reconstructed convs and dense shortcuts) as a patches matrix product "
                "(`benchmarks.patches.patches_convs`; its loss and gradient norm checked against the first "
                "program's), timed in the same rounds, compared with its reference's patches program; the "
                "Jester HO-CP net has no such conv, so it has one program. The library's own dense convs (and "
                "reconstructed CP convs) of 3 input channels over 3 modes, the video models' first convs, run as "
                "patches products in both programs (`hocp_jax.conv_plans.patches_conv`)."
                + (" `<name> (<policy> picks)` (`--policy-steps`): the same HO-CP step compiled under the other "
                   "policy of `implementation='auto'` (the measured one times each new conv shape while the step is "
                   "traced), its loss and gradient norm checked against the first program's, timed in the same "
                   "rounds." if any(r.get("policy") for r in results["models"]) else ""), ""]
        out += model_table(results["models"])
        out.append("")
        out += [f"`{r['name']}`: {len(r['picks_that_differ'])} of its picks differ from the first program's "
                f"({r['picks_traced']} `auto` picks traced; `auto`: x shape, output channels, strides; kernel "
                f"gradient: x shape, kernel shape; then the first program's pick, this one's: "
                + ("; ".join(", ".join(map(str, d)) for d in r["picks_that_differ"]) or "none") + ").\n"
                for r in results["models"] if "picks_that_differ" in r]
    out += ["Paper Figure 6 (analytic GFLOPs, cross-checked with XLA): `python -m benchmarks.figure6` -> "
            "[figure6.png](figure6.png).", ""]
    out += fault_lines(results)
    out += memory_lines(results)
    out += target_lines(results["targets"])
    out += placement_lines(results)
    return "\n".join(out)


def placement_lines(results: dict) -> list[str]:
    """The Jester layers', their stack's and the train steps' ratios over the rounds run with the two
    probed CPUs close and far apart (:mod:`benchmarks.placement`); empty if no round trip was recorded."""
    rows = [r for r in results["conv"].get("jester", []) if r.get("roundtrip_ns")]
    steps = {r["name"]: r for r in results["models"] if r.get("roundtrip_ns")}
    values = [v for r in rows + list(steps.values()) for v in r["roundtrip_ns"] if v]
    cut = placement.split_cut(values)
    if cut is None:
        return []
    out = ["## Cross-core placement of the rounds", "",
           f"Before each round `benchmarks.placement.CrossCoreProbe` timed a cache line's round trip between CPUs "
           f"{results['machine'].get('roundtrip_probe_cpus')} (pure Python; the fastest of "
           f"{placement.BATCHES} x {placement.TRIPS} trips): {min(values):.0f}-{max(values):.0f} ns in this run. A round "
           f"counts as split (the two CPUs far apart, most likely in different last-level-cache domains of the host: "
           f"EXPERIMENTS.md, \"Two speeds\") when it read over {placement.SPLIT_FACTOR} x the run's smallest, {cut:.0f} ns. The targets above use "
           "every round; here each layer's and step's rounds are split by placement: medians of the ratios within "
           "a round, and for the stack the sum of the layers' medians over their shared (split) rounds.", "",
           "| layer or step | ratio | rounds shared / split | shared rounds | split rounds |", "|---|---|---|---:|---:|"]

    def cell(m):
        return _f(m["median"])

    # per layer, the program each ratio divides by, chosen as in stack_total
    refs = {"JAX dense": lambda r: "dense", "faster JAX dense": lambda r: _faster(r, "dense", DENSE_PATCHES)}
    if all("torch dense" in r["times_ms"] for r in rows):
        refs |= {"PyTorch dense": lambda r: "torch dense", "TensorLy-Torch best": lambda r: _faster(r, *TLTORCH_PATHS)}
    sums: dict = {}
    for r in rows:
        a = r["times_ms"][_auto_path(r)]
        programs = {"auto": a} | {label: r["times_ms"][ref(r)] for label, ref in refs.items()}
        for label, b in list(programs.items())[1:]:
            m = placement.medians_by_placement([x / y for x, y in zip(a, b)], r["roundtrip_ns"], cut)
            out.append(f"| {r['name']} | auto / {label} | {m['shared']['n']} / {m['split']['n']} | {cell(m['shared'])} | "
                       f"{cell(m['split'])} |")
        for k, times in programs.items():  # each program's medians per placement, for the stack
            for where, v in placement.medians_by_placement(times, r["roundtrip_ns"], cut).items():
                sums.setdefault((k, where), []).append(v["median"])
    if rows:
        for label in refs:
            cells = []
            for k in ("shared", "split"):
                num, den = sums[("auto", k)], sums[(label, k)]
                cells.append(_f(sum(num) / sum(den)) if None not in num + den else "n/a")
            out.append(f"| **stack** | auto / {label} | | {cells[0]} | {cells[1]} |")
    for name, r in steps.items():
        if r.get("reference") in steps:
            q = round_ratios(r, steps[r["reference"]])
            m = placement.medians_by_placement(q, r["roundtrip_ns"], cut)
            out.append(f"| {name} | / {r['reference']} | {m['shared']['n']} / {m['split']['n']} | {cell(m['shared'])} | "
                       f"{cell(m['split'])} |")
    return out + [""]


def _met(v, goal, extra: str = ""):
    return "n/a" if v is None else f"{v:.2f} ({'met' if v <= goal else 'MISSED'}{extra})"


def _per_round(t: dict, key: str) -> str:
    q = t.get(f"{key} per round")
    return f"; per round {q['min']:.2f}-{q['max']:.2f}, median {q['median']:.2f}, {q['rounds']} rounds" if q else ""


def target_lines(t: dict) -> list[str]:
    if not t:
        return []
    out = ["## Targets of issue 13", ""]
    stack = [("jester_auto/dense", 0.5, "JAX dense"),
             ("jester_auto/faster dense", 0.5, "faster JAX dense program per layer (lax or patches)"),
             ("jester_auto/torch dense", 1.0, "PyTorch dense Conv3d"),
             ("jester_auto/tltorch best", 0.5, "TensorLy-Torch best CP path")]
    for key, goal, label in stack:
        if key in t:
            out.append(f"- Jester stack, HO-CP auto / {label} (goal <= {goal}): {_met(t[key], goal, _per_round(t, key))}.")
    for key, goal, label in [("resnet18_hocp static", 1.0, "HO-CP ResNet-18 2-D train step / dense 2-D"),
                             ("jester_hocp", 0.6, "Jester HO-CP net train step / dense"),
                             ("resnet18_hocp transduced", 0.35, "transduced HO-CP ResNet-18 / dense 3-D")]:
        if key in t:
            out.append(f"- {label} (goal <= {goal}): {_met(t[key], goal)}.")
        if f"{key} vs faster dense" in t:
            out.append(f"- {label}, faster program of each side (lax or patches convs) (goal <= {goal}): "
                       f"{_met(t[f'{key} vs faster dense'], goal)}.")
    if "worst_auto/best" in t:
        out.append(f"- auto <= 1.1 x best path on every layer: worst auto/best = {t['worst_auto/best']:.2f} "
                   f"({t['worst_auto/best_layer']}); auto picked the measured-faster path on "
                   f"{t['auto_correct']}/{t['n_layers']} layers.")
        if "worst_measured_autotune/best" in t:
            out.append(f"- The same bound for the measured autotune (`HOCP_JAX_AUTOTUNE=measure`, picking from its own "
                       f"timing of both paths): worst = {t['worst_measured_autotune/best']:.2f} "
                       f"({t['worst_measured_autotune/best_layer']}); the measured-faster path on "
                       f"{t['measured_autotune_correct']}/{t['n_layers']} layers.")
        out.append(f"- XLA forward FLOPs of the factorized path within 1.2x of the analytic count: "
                   f"{t['fact_flops_within_1.2']}/{t['n_layers']} layers (range {t['fact_xla/analytic_min']:.3f}"
                   f"-{t['fact_xla/analytic_max']:.3f})"
                   + ("; on a GPU XLA's count leaves out calls to vendor libraries (its dense convs, cuDNN's, read 0), so this line says little there."
                      if t.get("platform") == "gpu" else "."))
    return out + [""]


def targets(results: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    jt = results["totals"].get("jester")
    if jt:
        out |= {f"jester_{k}": v for k, v in jt["ratios"].items()}
        out |= {f"jester_{k} per round": v for k, v in jt.get("per_round_ratios", {}).items()}
    by_name = {r["name"]: r for r in results["models"]}
    faster = {name: min(r["ms"], by_name.get(patches_name(name), r)["ms"]) for name, r in by_name.items()}
    for r in results["models"]:
        if r["reference"] in by_name:
            out[r["name"]] = r["ms"] / by_name[r["reference"]]["ms"]
            if patches_name(r["reference"]) in by_name:
                out[f"{r['name']} vs faster dense"] = faster[r["name"]] / faster[r["reference"]]
    rows = [r for g in results["conv"].values() for r in g]
    if rows:
        worst = max(rows, key=lambda r: r["ratios"]["auto/best"])
        fx = [r["xla/analytic"]["factorized"] for r in rows if r["xla/analytic"]["factorized"]]
        out |= {
            "worst_auto/best": worst["ratios"]["auto/best"],
            "worst_auto/best_layer": f"{worst['group']} {worst['name']}",
            "auto_correct": sum(r["auto_choice"] == r["measured_best"] for r in rows),
            "n_layers": len(rows),
            "fact_flops_within_1.2": sum(1 / 1.2 <= v <= 1.2 for v in fx),
            "fact_xla/analytic_min": min(fx),
            "fact_xla/analytic_max": max(fx),
            "platform": results.get("machine", {}).get("platform"),
        }
    if rows and all("measured_autotune" in r for r in rows):
        mworst = max(rows, key=lambda r: r["measured_autotune"]["ratio to best"])
        out |= {
            "worst_measured_autotune/best": mworst["measured_autotune"]["ratio to best"],
            "worst_measured_autotune/best_layer": f"{mworst['group']} {mworst['name']}",
            "measured_autotune_correct": sum(r["measured_autotune"]["pick"] == r["measured_best"] for r in rows),
        }
    return out


def write(results: dict, out: str, md: str | None) -> None:
    """``results`` to ``out`` (JSON), then its markdown to ``md`` (default RESULTS.md next to ``out``)."""
    with open(out, "w") as f:  # before the report, which must never cost a run its results
        json.dump(results, f, indent=1)
    text = markdown(results)
    print(text)
    with open(md or os.path.join(os.path.dirname(out) or ".", "RESULTS.md"), "w") as f:
        f.write(text)


def partial(results: dict, out: str) -> None:
    """The rows so far to ``out``, marked ``"partial": true``, so that a run stopped early keeps
    what it timed (:func:`write` replaces the file at the end)."""
    with open(out, "w") as f:
        json.dump(results | {"partial": True}, f, indent=1)


def rescore(out: str, md: str | None) -> dict:
    """Recomputes a results file's stack totals and targets from its stored per-layer and per-step
    times (after a change in how they are derived) and rewrites it and its markdown; times nothing."""
    with open(out) as f:
        results = json.load(f)
    if "jester" in results["conv"]:
        results["totals"]["jester"] = stack_total(results["conv"]["jester"])
    results["targets"] = targets(results)
    results["rescored"] = f"python -m benchmarks.bench --rescore --out {out}"
    write(results, out, md)
    return results


def scaled(case: ConvCase | ModelCase, k: int) -> ConvCase | ModelCase:
    """``case`` with ``k`` times its batch size (``--batch-scale``)."""
    if isinstance(case, ConvCase):
        return dataclasses.replace(case, batch=case.batch * k)
    grow = (lambda shape: shape and (shape[0] * k, *shape[1:]))
    return dataclasses.replace(case, input_shape=grow(case.input_shape), transduce_from=grow(case.transduce_from))


def peer_device() -> str:
    """Where the PyTorch peers run: ``"cuda"`` when JAX's default backend is a GPU, else ``"cpu"``."""
    return "cuda" if jax.default_backend() == "gpu" else "cpu"


def positive_int(text: str) -> int:
    """An ``argparse`` type: ``text`` as an int >= 1, else a usage error (exit status 2)."""
    if not (text.isdecimal() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return int(text)


def parser() -> argparse.ArgumentParser:
    """The command line of :func:`main`."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1-2 repeats: a smoke test")
    ap.add_argument("--out", default="benchmarks/results.json", help="results file (JSON)")
    ap.add_argument("--md", default=None, help="markdown table (default: RESULTS.md next to --out)")
    ap.add_argument("--repeats", type=positive_int, default=None, help="max timed rounds per case")
    ap.add_argument("--only", nargs="+", choices=GROUPS, default=GROUPS, help="benchmark groups to run")
    ap.add_argument("--no-peers", action="store_true", help="skip PyTorch / TensorLy-Torch")
    ap.add_argument("--no-patches-steps", action="store_true",
                    help="time the train steps without their patches programs (XLA's GPU compiler aborted on one, "
                         "jax 0.11.2: benchmarks/EXPERIMENTS.md, stop 46)")
    ap.add_argument("--policy-steps", action="store_true",
                    help="also time each HO-CP train step compiled under the other policy of implementation='auto' "
                         "(analytic <-> measure), in the same rounds")
    ap.add_argument("--batch-scale", type=positive_int, default=1,
                    help="multiply every layer's and train step's batch size by this (e.g. GPU-sized batches)")
    ap.add_argument("--autotune", choices=autotune.POLICIES, default=None,
                    help="policy of implementation='auto' (default: $HOCP_JAX_AUTOTUNE, else measure on GPU, analytic elsewhere)")
    ap.add_argument("--rescore", action="store_true",
                    help="time nothing: recompute the totals, targets and markdown of --out from its stored times")
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.rescore:
        return rescore(args.out, args.md)
    autotune.configure(policy=args.autotune)
    repeats = args.repeats or (2 if args.quick else MAX_ROUNDS)
    # seconds of timed calls per conv case / train-step pair before stopping early
    budget, step_budget = (1.0, 4.0) if args.quick else (CONV_BUDGET_S, STEP_BUDGET_S)
    t_start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "batch_scale": args.batch_scale,
                               "conv": {}, "totals": {}, "models": [],
                               "autotune": autotune.policy(), "argv": list(sys.argv[1:] if argv is None else argv)}
    missing = "--no-peers given" if args.no_peers else peers.available()
    conv_cases = [scaled(c, args.batch_scale) for c in jester_cases(args.quick) + resnet_cases(args.quick)
                  if c.group in args.only]
    if missing:
        print(f"peers skipped (PyTorch / TensorLy-Torch): {missing}", flush=True)
    # the peers run where JAX runs: on the GPU when JAX's default backend is one (peers.set_precision)
    peer_proc = peers.PeerProcess(peer_device()) if conv_cases and not missing else None
    if peer_proc:
        results["machine"] |= peer_proc.info
    results["peers"] = list(peers.PEERS) if peer_proc else None
    results["peers_skipped"] = None if peer_proc else missing or "no layer benchmarks in this run (--only)"
    # the round trip between two CPUs before each round (placement.py): where the programs run on them
    probe = placement.CrossCoreProbe(enabled=jax.default_backend() == "cpu")
    results["machine"]["roundtrip_probe_cpus"] = list(probe.cpus) if probe.available else None
    print(json.dumps(results["machine"]), flush=True)
    with probe:
        try:
            for case in conv_cases:
                row = run_conv_case(case, repeats, budget, peer_proc, probe.roundtrip_ns)
                results["conv"].setdefault(case.group, []).append(row)
                partial(results, args.out)
                print(f"[{time.perf_counter() - t_start:6.0f}s] {case.group} {case.name}: "
                      + ", ".join(f"{p} {v:.1f} ms" for p, v in row["ms"].items()) + f"; auto={row['auto_choice']}",
                      flush=True)
        finally:
            if peer_proc:
                peer_proc.close()
        if "jester" in results["conv"]:
            results["totals"]["jester"] = stack_total(results["conv"]["jester"])
        if "models" in args.only:
            cases = [scaled(c, args.batch_scale) for c in model_cases(args.quick)]
            for ref in [c for c in cases if c.reference is None]:
                for row in run_model_pair([ref] + [c for c in cases if c.reference == ref.name], repeats, step_budget,
                                          with_patches=not args.no_patches_steps, with_policies=args.policy_steps,
                                          probe=probe.roundtrip_ns):
                    results["models"].append(row)
                    print(f"[{time.perf_counter() - t_start:6.0f}s] model {row['name']}: {row['ms']:.1f} ms/step",
                          flush=True)
                partial(results, args.out)
    results["wall_s"] = time.perf_counter() - t_start
    results["machine"]["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["targets"] = targets(results)
    write(results, args.out, args.md)
    return results


if __name__ == "__main__":
    main()
