"""How ``implementation="auto"`` picks a CP conv path, and how a conv of a computed kernel takes
its kernel gradient: analytic model or measured autotune.

:func:`choose_cp` is called by :func:`hocp_jax.conv.cp_conv` at trace time with static shapes;
:func:`choose_kernel_grad` likewise for the 2-D convs of a computed or trained kernel (XLA's
kernel-gradient convolution or matrix products per tap; analytic:
:func:`hocp_jax.conv_plans.matmul_kernel_grad`). The rules that shape each path's program without
timing it (loops, routes, dtypes) are in :mod:`hocp_jax.conv_plans`. Policies (:func:`configure`,
or the environment variable ``HOCP_JAX_AUTOTUNE``; unset, the backend's default,
:data:`DEFAULT_POLICIES`: measured on GPU, analytic elsewhere):

* ``"analytic"`` (the default on CPU and TPU): no timing. On CPU,
  :func:`hocp_jax.conv.choose_cp_implementation` (the cost model of
  :func:`hocp_jax.counting.cp_path_costs`, calibrated on a 2-core CPU). On GPU/TPU, whose dense
  convs run near peak, the safe default is ``"reconstructed"`` unless rebuilding the kernel costs
  more FLOPs than the conv itself (small batch x spatial size and a large rank), then
  ``"factorized"``.
* ``"measure"`` (the default on GPU): the first trace of each new key times both paths once
  (the output, computed as for a next layer, and the grads w.r.t. the parameters, and w.r.t.
  ``x`` if ``input_grad``, from a random output cotangent: :func:`timed_programs`; the two kernel
  gradients likewise, :func:`timed_kernel_grad_programs`) on concrete dummy inputs of the static
  shapes, on the default backend, in interleaved rounds, and keeps the faster (a kernel gradient:
  the rule's unless the other wins clearly, :data:`KERNEL_GRAD_OVERRIDE`). Results are cached in
  memory per key ``(backend, device kind, host kind, x shape, dtype, parameter shapes, stride,
  padding, dilation, input_grad, per_sample, the per-sample and tile modes in force, and
  :data:`MEASURE_VERSION`)`` (:func:`cache_key`, :func:`kernel_grad_key`) and, with
  ``cache_path``, in a JSON file that later processes reuse (its directory made when first
  written; a file that is not a JSON object of picks warns and is ignored, then rewritten: a
  corrupt cache costs timings, not the run). A timing that raises (e.g. the
  device runs out of memory for the dummy inputs) warns and takes the analytic pick for that
  key, kept in memory only, so the trace goes on.

Data parallelism: both policies consider a conv on the batch one device runs, ``ceil(B / n)``
of the traced ``B``, so the measured policy times (and keys its cache on) the per-device shape,
not the global batch on one device. ``n`` is read from the traced array's type under explicit
sharding (``jax.make_mesh``'s default axis type; :func:`hocp_jax.explicit_sharding.shards`), else set by
``configure(batch_shards=n)`` (``train.py``: its auto-axis mesh of all devices, whose tracers
carry no sharding). On CPU such a conv is traced inside ``shard_map`` on the device's share
(:func:`hocp_jax.conv_plans.batch_split`), and its timed programs are compiled outside that mesh, on one device.

Multi-host: every process must trace the same program, so processes never time on their own
(timings differ between hosts). :func:`agree_across_processes` lets process 0 trace the program
to come first, timing its convs and writing the cache file, after which every process reads that
file; a conv traced with ``jax.process_count() > 1`` that is not in the cache gets the analytic
pick, which is deterministic.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hocp_jax import conv_plans
from hocp_jax.checks import is_path
from hocp_jax.processes import on_process_zero

POLICIES = ("analytic", "measure")
ENV_VAR = "HOCP_JAX_AUTOTUNE"
DEFAULT_POLICIES = {"gpu": "measure"}
"""The policy when neither :func:`configure` nor :data:`ENV_VAR` sets one, per
``jax.default_backend()``; ``"analytic"`` on the others. GPU since stop 47: on one H200 (stop 46)
at 16 times the benchmark's batch (128 Jester clips, 128 ResNet-18 images) the analytic GPU rule
took 1.24x and 1.74x the faster path's time on two of six layers (Jester conv1 and conv4), where
the measured policy picked the faster path on all six; at the benchmark's batch of 8, layers of
0.6-4.1 ms, the rule picked it on 16 of 18 (worst 1.12x) and the measured policy, then timing
single calls, on 13 (worst 1.42x; short calls are repeated since, :data:`MIN_SAMPLE_S`). TPU keeps
the analytic rule: not measured there, and its dense convs run on the matrix unit while the
factorized path's depthwise passes do not."""
ROUNDS = 5
MEASURE_VERSION = 13
"""Part of every cache key: picks timed by an earlier :func:`measure`, or of programs the library has since
changed, are not reused. Version 13 (stop 75): on CPU, 2-D inputs run in chunks of samples only on hosts that
list AMX (:data:`hocp_jax.conv_plans.DENSE_CHUNK_CPU_FLAGS`, in :func:`hocp_jax.conv_plans.host_kind`). Version 12 (stop 69): on CPU, tiles follow the L2 size
(:func:`hocp_jax.conv_plans.tile_target_bytes`), and :func:`hocp_jax.conv_plans.host_kind` holds it; large 2-D
inputs run in chunks of samples (:func:`hocp_jax.conv_plans.dense_chunk`). Version 11 (stop 65): on CPU, the
patches product of a conv with wide in-plane patches is one product per tap of its leading mode
(:func:`hocp_jax.conv_plans.patches_split`). Version 10 (stops 63 and 64): on CPU, the factorized path of few
input channels pairs rows (:func:`hocp_jax.conv_plans.paired_rows`) and folds passes into its tiles' input
contraction (:func:`hocp_jax.conv_plans.tile_fold_modes`), and at small ranks takes its output factor
transposed (:func:`hocp_jax.conv_plans.out_factor_before_loops`). Version 9 (stop 61): on CPU, the
reconstructed path on a map with a mode shorter than the kernel runs as per-tap products
(:func:`hocp_jax.conv_plans.small_map_taps`). Version 8 (stop 50): on CPU, the reconstructed path of a 3-D+
conv with few input channels runs as a patches matrix product (:func:`hocp_jax.conv_plans.patches_conv`).
Version 7 (stop 46): the timed programs take their inputs as parameters, not constants, and short calls are
repeated within a sample (:func:`_median_times`). Version 6 (stop 42): the factorized path computes bfloat16
and float16 in float32 on CPU (:func:`hocp_jax.conv_plans.compute_dtype`). Version 5 (stop 41): the kernel
gradient of a conv of a computed kernel is a pick of its own (:func:`choose_kernel_grad`, measured under the
measured policy), and the keys hold :func:`hocp_jax.conv_plans.host_kind`. Version 4 (stop 40): the key held
the host's kernel-gradient rule. Version 3 (stop 39): the reconstructed path of a 2-D conv computes its kernel
gradient with matrix products (:func:`hocp_jax.conv_ops.conv_matmul_kernel_grad`). Version 2 (stop 38) times the
conv's output too (:func:`timed_programs`); version 1 timed gradients alone, which left out the reconstructed
path's forward conv and favoured that path."""

PICKS = ("factorized", "reconstructed", "matmul", "xla")  # what the cache file maps keys to

_config: dict[str, Any] = {"policy": None, "cache_path": None, "leader": False}
_cache: dict[str, str] = {}
_disk_loaded: set[str] = set()


def configure(policy: str | None = None, cache_path: str | None = None, batch_shards: int | None = None,
              per_sample: bool | None = None, tile_rows: int | None = None) -> None:
    """Sets the policy (``"analytic"``/``"measure"``; ``None`` = environment, else the backend's default,
    :func:`policy`), an optional JSON cache file for measured picks, ``batch_shards``: how many devices the
    batch axis of the traced programs is split over (``None``: 1; see the module docstring), and what
    :func:`hocp_jax.conv_plans.per_sample_mode` and :func:`hocp_jax.conv_plans.tile_rows_mode` set for a
    block, for every trace from now on (``None``: the automatic rules). ``per_sample=True`` (with
    ``tile_rows`` rows, the bound at one sample per device) is the memory option on GPU/TPU, where the rules
    leave the loops off: the factorized convs then keep one sample's (one tile's) intermediates instead of the
    whole batch's (README, "Memory"). ``cache_path`` must not be a directory."""
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: expected one of {POLICIES}")
    if cache_path is not None:
        if not is_path(cache_path) or os.path.isdir(cache_path):
            raise ValueError(f"cache_path={cache_path!r}: expected None or the path of a JSON file (not a directory)")
        cache_path = os.fspath(cache_path)
    conv_plans.set_defaults(batch_shards=batch_shards, per_sample=per_sample, tile_rows=tile_rows)
    _config.update(policy=policy, cache_path=cache_path)


def policy_mode(value: str) -> contextlib.AbstractContextManager:
    """Within the block, :func:`policy` answers ``value`` (``"analytic"``/``"measure"``), whatever
    :func:`configure` or ``$HOCP_JAX_AUTOTUNE`` say; the cache file and ``batch_shards`` stay as
    configured. Read at trace time, like :func:`hocp_jax.conv_plans.per_sample_mode` (e.g. to
    compile one train step with the measured picks beside one with the analytic picks)."""
    if value not in POLICIES:
        raise ValueError(f"value={value!r}: expected one of {POLICIES}")
    return conv_plans.scoped(_config, "policy", value)


def policy() -> str:
    """The policy in force (:func:`configure`, else ``$HOCP_JAX_AUTOTUNE``, else the backend's
    :data:`DEFAULT_POLICIES` entry, else ``"analytic"``); ``"analytic"`` in a
    :func:`hocp_jax.conv_plans.target_mode` block for another backend than this process's,
    which nothing here can time."""
    if conv_plans.backend() != jax.default_backend():
        return "analytic"
    value = _config["policy"] or os.environ.get(ENV_VAR) or DEFAULT_POLICIES.get(jax.default_backend(), "analytic")
    if value not in POLICIES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {POLICIES}")
    return value


def clear_cache() -> None:
    """Forgets the in-memory picks (the disk file is left alone)."""
    _cache.clear()
    _disk_loaded.clear()


def cache_key(x_shape, dtype, param_shapes: Mapping[str, Sequence[int]], modes, strides, pads, dilations,
              input_grad: bool, per_sample: bool | None = None) -> str:
    """The cache key of one call: backend, device kind, :func:`hocp_jax.conv_plans.host_kind`, shapes, dtype,
    geometry, ``input_grad``, ``per_sample``, the :func:`hocp_jax.conv_plans.per_sample_mode`,
    :func:`hocp_jax.conv_plans.tile_rows_mode` and :func:`hocp_jax.conv_plans.upcast_mode` in force (they
    change the factorized program too), the :func:`hocp_jax.conv_plans.dense_chunks_mode` (the reconstructed
    one) and :data:`MEASURE_VERSION`; on the CPU backend, for a conv traced without a program of its own per
    device (:func:`hocp_jax.conv_plans.loops_apply` false: no per-sample, chunk or tile loops), also the
    marker ``"no loops"``, so that a per-device shape timed with its loops and without them are two picks (the
    key of the usual case, with loops, is as before: cache files stay valid), and for a conv traced in a
    :func:`hocp_jax.conv_plans.loop_mode` block the marker ``"in loop"`` (its reconstructed program differs
    there)."""
    dev = jax.devices()[0]
    markers = (["no loops"] if dev.platform == "cpu" and not conv_plans.loops_apply() else []) + (
        ["in loop"] if conv_plans.cpu_loop_mode() else [])
    return json.dumps([dev.platform, dev.device_kind, conv_plans.host_kind(), list(x_shape), jnp.dtype(dtype).name,
                       sorted((k, list(v)) for k, v in param_shapes.items()), list(modes), list(strides),
                       [list(p) for p in pads], list(dilations), bool(input_grad), per_sample,
                       *conv_plans.modes_in_force(), MEASURE_VERSION, *markers])


def kernel_grad_key(x_shape, dtype, kernel_shape: Sequence[int], strides, pads, dilations, input_grad: bool) -> str:
    """The cache key of one :func:`choose_kernel_grad` call: backend, device kind,
    ``"kernel_grad"``, :func:`hocp_jax.conv_plans.host_kind`, shapes, dtype, geometry,
    ``input_grad`` and :data:`MEASURE_VERSION`."""
    dev = jax.devices()[0]
    return json.dumps([dev.platform, dev.device_kind, "kernel_grad", conv_plans.host_kind(), list(x_shape),
                       jnp.dtype(dtype).name, list(kernel_shape), list(strides), [list(p) for p in pads],
                       list(dilations), bool(input_grad), MEASURE_VERSION])


def _read_disk(path: str) -> dict[str, str]:
    """The picks in the cache file (``{}`` where there is none); a file that cannot be read or is not a
    JSON object of :data:`PICKS` warns, naming it, and counts as empty (:func:`_save_disk` rewrites it)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as err:
        entries = f"{type(err).__name__}: {err}"
    if isinstance(entries, dict) and all(v in PICKS for v in entries.values()):
        return entries
    warnings.warn(f"hocp_jax.autotune: the cache file {path} is not a JSON object of picks ({str(entries)[:200]}); "
                  "ignored, and rewritten with the picks timed from now on", RuntimeWarning)  # one place: shown once
    return {}


def _load_disk(path: str) -> None:
    if path in _disk_loaded:
        return
    _disk_loaded.add(path)
    _cache.update(_read_disk(path))


def _save_disk(path: str, key: str, pick: str) -> None:
    entries = _read_disk(path)
    entries[key] = pick
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=0)
    os.replace(tmp, path)


def analytic_pick(x_shape, params, modes, strides, pads, dilations, input_grad: bool, dtype=jnp.float32,
                  per_sample: bool | None = None) -> str:
    """The analytic pick (see module docstring) for the default backend; ``dtype`` of ``x`` and
    ``per_sample`` as given to :func:`hocp_jax.conv.cp_conv` (they set
    :func:`hocp_jax.conv_plans.batch_plan`)."""
    from hocp_jax import conv, counting

    if conv_plans.backend() == "cpu":
        return conv.choose_cp_implementation(x_shape, params, modes, stride=strides, padding=pads, dilation=dilations,
                                             input_grad=input_grad, dtype=dtype, per_sample=per_sample)
    ks = tuple(params[conv.mode_key(m)].shape[0] for m in modes)
    c_in, c_out, rank = params["factor_in"].shape[0], params["factor_out"].shape[0], params["lambda"].shape[0]
    conv_flops = x_shape[0] * counting.dense_flops(tuple(x_shape[1:-1]), c_in, c_out, ks, stride=strides, padding=pads,
                                                   dilation=dilations)
    return "reconstructed" if counting.cp_reconstruct_flops(c_in, c_out, ks, rank) <= conv_flops else "factorized"


def timed_programs(x_shape, dtype, params, modes, strides, pads, dilations, input_grad: bool,
                   per_sample: bool | None = None) -> tuple[dict[str, Callable], tuple]:
    """What :func:`measure` times: ``({path: jitted fn}, args)``, ``fn(*args)`` = the value and the
    gradients (w.r.t. the parameters, and ``x`` if ``input_grad``) of ``sum(conv(x) * cot)`` on
    dummy inputs of these shapes, from a random output cotangent ``cot`` (XLA exploits the all-ones
    one of a ``sum()`` loss). The value makes the program compute the conv's output, as a layer of
    a network does for the next layer: gradients alone need none of the reconstructed path's
    forward conv, which XLA then drops (its time was missing from that path's reading)."""
    from hocp_jax import conv

    rng = np.random.default_rng(0)
    with jax.ensure_compile_time_eval():
        x = jnp.asarray(rng.normal(size=x_shape), dtype)
        p = {k: jnp.asarray(rng.normal(size=v.shape) / np.sqrt(max(v.shape[0], 1)), v.dtype) for k, v in params.items()}

        def forward(x, p, impl):
            return conv.cp_conv(x, p, modes=modes, stride=strides, padding=pads, dilation=dilations,
                                implementation=impl, per_sample=per_sample)

        cot = jnp.asarray(rng.normal(size=jax.eval_shape(lambda x, p: forward(x, p, "factorized"), x, p).shape), dtype)
    calls = {impl: jax.jit(jax.value_and_grad(lambda x, p, cot, impl=impl: jnp.sum(forward(x, p, impl) * cot),
                                              argnums=(0, 1) if input_grad else 1))
             for impl in ("factorized", "reconstructed")}
    return calls, (x, p, cot)


def measure(x_shape, dtype, params, modes, strides, pads, dilations, input_grad: bool,
            rounds: int = ROUNDS, per_sample: bool | None = None) -> dict[str, float]:
    """Median seconds of both paths' :func:`timed_programs` (fwd + bwd), interleaved over
    ``rounds``, the factorized one with :func:`hocp_jax.conv.cp_conv`'s ``per_sample``."""
    return _median_times(*timed_programs(x_shape, dtype, params, modes, strides, pads, dilations, input_grad,
                                         per_sample), rounds)


def timed_kernel_grad_programs(x_shape, dtype, kernel_shape, strides, pads, dilations,
                               input_grad: bool) -> tuple[dict[str, Callable], tuple]:
    """What :func:`measure_kernel_grad` times: ``({"matmul" | "xla": jitted fn}, args)``, ``fn(*args)``
    = the value and the gradients (w.r.t. the kernel, and ``x`` if ``input_grad``) of
    ``sum(conv(x, kernel) * cot)`` on dummy inputs, with the kernel gradient as matrix products
    (:func:`hocp_jax.conv_ops.conv_matmul_kernel_grad`) or XLA's."""
    from hocp_jax import conv_ops

    rng = np.random.default_rng(0)
    strides, pads, dilations = tuple(strides), tuple(map(tuple, pads)), tuple(dilations)
    convs = {"matmul": lambda x, k: conv_ops.conv_matmul_kernel_grad(x, k, strides=strides, pads=pads,
                                                                     dilations=dilations),
             "xla": lambda x, k: conv_ops.dense_conv(x, k, stride=strides, padding=pads, dilation=dilations)}
    with jax.ensure_compile_time_eval():
        x = jnp.asarray(rng.normal(size=x_shape), dtype)
        k = jnp.asarray(rng.normal(size=kernel_shape) / np.sqrt(np.prod(kernel_shape[:-1])), dtype)
        cot = jnp.asarray(rng.normal(size=jax.eval_shape(convs["xla"], x, k).shape), dtype)
    calls = {name: jax.jit(jax.value_and_grad(lambda x, k, cot, f=f: jnp.sum(f(x, k) * cot),
                                              argnums=(0, 1) if input_grad else 1))
             for name, f in convs.items()}
    return calls, (x, k, cot)


def _median_times(calls: Mapping[str, Callable], args: tuple, rounds: int) -> dict[str, float]:
    """Median seconds of each ``call(*args)`` after one warm-up, interleaved over ``rounds`` (the
    order reversed every other round). ``args`` are per-device shapes already: the calls are traced
    with ``batch_shards`` unset, so picks made inside them (the kernel gradient of the reconstructed
    path's conv) see the same shapes.

    Each call is compiled ahead of time for ``args`` (``jax.jit(call).lower(*args).compile()``), so
    that ``args`` are the program's parameters, as a layer's inputs are in a train step, also when
    this runs while a caller's function is being traced. (Until stop 46 the calls ran under
    ``jax.ensure_compile_time_eval()``, which made XLA embed the cotangent and the weights as
    constants: 4.16 GB of them for the Jester conv1 at batch 128 on a GPU.)

    A call shorter than :data:`MIN_SAMPLE_S` is timed ``repeats_per_sample`` times back to back per
    sample (dispatched without waiting, as a train loop's steps are) and its mean taken, so that
    host-side jitter does not decide between sub-millisecond GPU programs."""
    with conv_plans.batch_shards_mode(None):
        compiled = {k: jax.jit(fn).lower(*args).compile() for k, fn in calls.items()}
        reps = {}
        for name, fn in compiled.items():
            jax.block_until_ready(fn(*args))  # warm-up
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            reps[name] = repeats_per_sample(time.perf_counter() - t0)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for r in range(rounds):
            for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                t0 = time.perf_counter()
                for _ in range(reps[name] - 1):
                    compiled[name](*args)
                jax.block_until_ready(compiled[name](*args))
                times[name].append((time.perf_counter() - t0) / reps[name])
    return {k: statistics.median(v) for k, v in times.items()}


MIN_SAMPLE_S = 0.01
"""Shortest timed sample of :func:`_median_times`; shorter calls are repeated within a sample
(:func:`repeats_per_sample`). On an H200 (stop 46) the benchmark's layers at batch 8 ran 0.6-4.1 ms,
and the measured policy, timing single calls (of programs that then held their inputs as
constants), picked the faster path on 13 of 18; at 16 times the batch, 0.8-53 ms, on 6 of 6. Not
re-timed on a GPU since. On the 2-core CPU the benchmark's layers take tens of ms or more: one
call per sample, as before."""


def repeats_per_sample(call_s: float, max_repeats: int = 100) -> int:
    """How many back-to-back calls of ``call_s`` seconds one timed sample of :func:`_median_times`
    holds: enough for :data:`MIN_SAMPLE_S`, at most ``max_repeats``."""
    return max(1, min(max_repeats, int(np.ceil(MIN_SAMPLE_S / max(call_s, 1e-9)))))


def measure_kernel_grad(x_shape, dtype, kernel_shape, strides, pads, dilations, input_grad: bool,
                        rounds: int = ROUNDS) -> dict[str, float]:
    """Median seconds of both kernel gradients' :func:`timed_kernel_grad_programs`."""
    return _median_times(*timed_kernel_grad_programs(x_shape, dtype, kernel_shape, strides, pads, dilations,
                                                     input_grad), rounds)


KERNEL_GRAD_OVERRIDE = 0.85
"""Under the measured policy, :func:`choose_kernel_grad` departs from
:func:`hocp_jax.conv_plans.matmul_kernel_grad`'s answer only when the other kernel gradient took at
most this fraction of its time. One conv's 5-round timing is noisy (stop 41, this host: five timings
of each of the HO-CP ResNet-18 2-D step's eight conv shapes moved by up to 0.45 in products / XLA's,
e.g. 0.91-1.09 and 0.70-1.13), and picks taken on 5-9 % wins made that step 1.02-1.05x slower than
the rule's (scratch, 15 interleaved rounds; benchmarks/EXPERIMENTS.md, "Kept (stop 41)"), while the
wins the rule misses run to 0.57-0.76x."""


def choose_kernel_grad(x_shape, dtype, kernel_shape, strides, pads, dilations, input_grad: bool = True) -> bool:
    """Whether the 2-D conv of a computed kernel on ``x`` (traced shape ``x_shape``; not
    explicitly sharded, :func:`hocp_jax.conv_ops.weight_conv`) takes
    matrix-product kernel gradients (:func:`hocp_jax.conv_ops.conv_matmul_kernel_grad`), under the
    current :func:`policy`: analytic, :func:`hocp_jax.conv_plans.matmul_kernel_grad`; measured, that rule's answer
    unless a timing of the per-device shape (:func:`measure_kernel_grad`) has the other kernel
    gradient within :data:`KERNEL_GRAD_OVERRIDE` of its time, cached like :func:`choose_cp`'s picks
    (:func:`kernel_grad_key`). Inside a :func:`hocp_jax.conv_plans.loop_mode` block on the CPU backend: always;
    inside a :func:`hocp_jax.conv_plans.forward_mode` block, or on a symbolic shape
    (:func:`hocp_jax.conv_plans.is_static`): never."""
    if conv_plans.forward_mode_on():
        return False
    if conv_plans.cpu_loop_mode():
        return True
    if not conv_plans.is_static(x_shape):
        return False
    shape = conv_plans.device_shape(x_shape)
    geometry = (strides, pads, dilations)
    key = kernel_grad_key(shape, dtype, kernel_shape, *geometry, input_grad) if policy() == "measure" else None

    def rule() -> str:
        return "matmul" if conv_plans.matmul_kernel_grad(x_shape, dtype) else "xla"

    def timed() -> str:
        times, ruled = measure_kernel_grad(shape, dtype, kernel_shape, *geometry, input_grad), rule()
        other = "xla" if ruled == "matmul" else "matmul"
        return other if times[other] <= KERNEL_GRAD_OVERRIDE * times[ruled] else ruled

    return _cached_pick(key, rule, timed) == "matmul"


def choose_cp(x_shape, dtype, params, modes, strides, pads, dilations, input_grad: bool = True,
              per_sample: bool | None = None, batch_shards: int | None = None) -> str:
    """``"factorized"`` or ``"reconstructed"`` for one CP conv call under the current :func:`policy`.

    ``x_shape``: as traced; the batch per device follows from ``batch_shards`` (the traced array's
    split, :func:`hocp_jax.explicit_sharding.shards`) if given, else from :func:`configure`'s.
    ``params`` may hold arrays, tracers or ``jax.ShapeDtypeStruct``; only shapes and dtypes are read.
    ``per_sample``: :func:`hocp_jax.conv.cp_conv`'s argument; the analytic policy counts the
    :func:`hocp_jax.conv_plans.batch_plan` it gives, the measured one times the factorized path with it (it is part
    of the cache key).
    A symbolic dimension (``jax.export``'s shape polymorphism, :func:`hocp_jax.conv_plans.is_static`)
    counts as its smallest size, under either policy (the analytic pick: there is nothing to
    time): a batch as 1, the pick for one sample (the rebuilt kernel's cost weighs most there), a
    spatial size as the least the padded kernel takes (1, or the kernel's extent less the pads),
    mostly the factorized path. Export with the batch you serve, or pass ``implementation``, to
    choose otherwise. ``params`` without a factor of ``modes``, a ``dtype`` that is none or a bad
    ``batch_shards`` is a ValueError.
    """
    from hocp_jax import conv, tree

    missing = [k for k in (*tree.CP_KEYS, *map(conv.mode_key, modes)) if k not in params]
    if missing:
        raise ValueError(f"params: no {missing} (modes={tuple(modes)!r}); got keys {sorted(params)}")
    try:
        jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype={dtype!r}: expected a dtype") from None
    conv_plans.check_batch_shards(batch_shards, "batch_shards")
    if not conv_plans.is_static(x_shape):
        least = [1] + [max(1, d * (params[conv.mode_key(m)].shape[0] - 1) + 1 - lo - hi)
                       for m, d, (lo, hi) in zip(modes, dilations, pads)] + [1]
        x_shape = tuple(d if conv_plans.is_static((d,)) else n for d, n in zip(x_shape, least))
        return analytic_pick(x_shape, params, modes, strides, pads, dilations, input_grad, dtype, per_sample)
    x_shape = conv_plans.device_shape(x_shape, batch_shards)
    geometry = (modes, strides, pads, dilations)
    key = None
    if policy() == "measure":
        key = cache_key(x_shape, dtype, {k: tuple(v.shape) for k, v in params.items()}, *geometry, input_grad, per_sample)

    def timed() -> str:
        specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}
        times = measure(x_shape, dtype, specs, *geometry, input_grad, per_sample=per_sample)
        return min(times, key=times.get)

    return _cached_pick(key, lambda: analytic_pick(x_shape, params, *geometry, input_grad, dtype, per_sample), timed)


def _cached_pick(key: str | None, analytic: Callable[[], str], timed: Callable[[], str]) -> str:
    """A pick under the current policy: ``analytic()`` without a ``key`` (the analytic policy);
    else the cached pick of ``key`` (memory, then the cache file), or, when this process may time
    (one process, or the leader of :func:`agree_across_processes`; the others take ``analytic()``),
    ``timed()``'s pick, cached and written to the file. If ``timed()`` raises, a warning and
    ``analytic()``, cached in memory only (a multi-process leader's other processes, not finding
    the key in the file, take ``analytic()`` too)."""
    if key is None:
        return analytic()
    path = _config["cache_path"]
    if path:
        _load_disk(path)
    if key in _cache:
        return _cache[key]
    if jax.process_count() > 1 and not _config["leader"]:  # all processes must pick alike
        return analytic()
    # The timed programs run on one device outside any mesh (also when the conv is traced inside
    # shard_map, whose manual mesh they must not inherit), with the loops of the program being traced.
    try:
        with (conv_plans.per_device_mode(conv_plans.program_per_device()),
              jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ()))):
            pick = timed()
    except Exception as err:  # noqa: BLE001 -- a failed timing must not fail the caller's trace
        pick = _cache[key] = analytic()
        warnings.warn(f"hocp_jax.autotune: timing a conv failed ({type(err).__name__}: {err}); took the analytic "
                      f"pick {pick!r} for it", RuntimeWarning, stacklevel=2)
        return pick
    _cache[key] = pick
    if path:
        _save_disk(path, key, pick)
    return pick


def agree_across_processes(trace: Callable[[], Any]) -> None:
    """Measured picks for a multi-process run: process 0 calls ``trace()`` (a trace of the program to come,
    e.g. ``jax.eval_shape`` of the train step on the global batch's shapes), which times each conv not yet in
    the cache and writes the picks to the cache file; then every process waits for the others
    (:func:`hocp_jax.processes.on_process_zero`: if the trace raised, it raises on every process) and reads
    the file, so that all trace the same picks. Convs traced later under other shapes (e.g. an eval step's)
    get the analytic pick. A no-op with one process, under the analytic policy or without a cache file. Every
    process must call it, at the same point of the program."""
    path = _config["cache_path"]
    if jax.process_count() == 1 or policy() != "measure" or not path:
        return

    def lead():
        _config["leader"] = True
        try:
            trace()
        finally:
            _config["leader"] = False

    on_process_zero(lead, "hocp_jax.autotune.agree_across_processes")  # a failure raises everywhere
    _disk_loaded.discard(path)
    _load_disk(path)
