"""How each conv of the library runs on this backend, host and trace: the rules that pick its
program, the blocks that override them, and what they read of the trace.

:mod:`hocp_jax.conv` asks these rules at trace time, with the traced shapes, and they answer
without timing anything (:mod:`hocp_jax.autotune` picks between the CP paths, and may time them);
a shape with a symbolic dimension (``jax.export``) gets the GPU/TPU answers (:func:`is_static`),
and a :func:`target_mode` block the answers of the backend it names (:func:`backend`):

* where the conv runs: the batch one device runs (:func:`device_shape`), whether it is a program
  of its own per device (:func:`program_per_device`, :func:`batch_split`), inside a loop's body
  (:func:`loop_mode`), and on what host (:func:`host_kind`: CPU flags, L2 size);
* convs of a given kernel (the models' dense convs and the CP, Tucker and TT reconstructed
  paths) on CPU: as one matrix product of their patches (:func:`patches_conv`,
  :func:`patches_split`), per tap on maps smaller than the kernel (:func:`small_map_taps`), with
  matrix-product kernel gradients (:func:`matmul_kernel_grad`), in chunks of samples
  (:func:`dense_chunk`);
* the factorized CP path: its compute dtype (:func:`compute_dtype`), its loops over samples,
  chunks of samples and tiles of rows (:func:`batch_plan`, :func:`tile_plan`), and the shapes of
  its products (:func:`paired_rows`, :func:`out_factor_before_loops`, :func:`tile_fold_modes`).

Each rule's docstring gives the measurements behind its thresholds (benchmarks/EXPERIMENTS.md).
Each ``*_mode`` function returns a block within which its rule answers as told; the blocks, like
the rules, are read at trace time: ``jax.jit`` keys its cache on the function and the argument
shapes, not on them, so a function traced before a block keeps its earlier program.
:func:`hocp_jax.autotune.configure` sets the batch split, the per-sample and the tile-rows
settings for every trace (:func:`set_defaults`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hocp_jax.checks import is_int, is_positive_int

_config: dict[str, Any] = {"batch_shards": None, "per_sample": None, "tile_rows": None, "upcast": None,
                           "per_device": None, "in_loop": False, "paired_rows": None, "tile_fold": None,
                           "patches_split": None, "dense_chunks": None, "forward_mode": False, "target": None}

BACKENDS = ("cpu", "gpu", "tpu")
"""The backends the rules know; ``jax.export``'s platform names map to them (``"cuda"`` and
``"rocm"`` to ``"gpu"``)."""


@contextlib.contextmanager
def scoped(store: dict[str, Any], key: str, value):
    """Within the block, ``store[key]`` is ``value``: the ``*_mode`` blocks of this module and
    :func:`hocp_jax.autotune.policy_mode`."""
    previous = store[key]
    store[key] = value
    try:
        yield
    finally:
        store[key] = previous


def set_defaults(batch_shards: int | None = None, per_sample: bool | None = None,
                 tile_rows: int | None = None) -> None:
    """What :func:`batch_shards_mode`, :func:`per_sample_mode` and :func:`tile_rows_mode` set for a
    block, for every trace from now on (``None``: unset, the automatic rules); called by
    :func:`hocp_jax.autotune.configure`."""
    _config.update(batch_shards=check_batch_shards(batch_shards, "batch_shards"),
                   per_sample=automatic_flag(per_sample, "per_sample"),
                   tile_rows=check_tile_rows(tile_rows, "tile_rows"))


def modes_in_force() -> tuple:
    """The settings of :func:`per_sample_mode`, :func:`tile_rows_mode`, :func:`upcast_mode`,
    :func:`dense_chunks_mode` and :func:`forward_mode` in force: they change the CP paths'
    programs, so the measured picks' cache keys hold them (:func:`hocp_jax.autotune.cache_key`)."""
    return tuple(_config[k] for k in ("per_sample", "tile_rows", "upcast", "dense_chunks", "forward_mode"))


def backend() -> str:
    """The backend the rules answer for: this process's (``jax.default_backend()``), or a
    :func:`target_mode` block's."""
    return _config["target"] or jax.default_backend()


def target_mode(platform: str) -> contextlib.AbstractContextManager:
    """Within the block, the rules answer for ``platform`` (one of :data:`BACKENDS`, or a
    ``jax.export`` platform name: ``"cuda"``, ``"rocm"``), whatever this process's backend: to
    export for a GPU on a CPU host (:meth:`hocp_jax.training.Trained.export` with ``platforms``)
    with the GPU's routes, not this host's. The measured autotune cannot time another backend:
    there ``auto`` takes the analytic pick (:func:`hocp_jax.autotune.policy`). Read at trace
    time, like the other blocks.

    Raises:
        ValueError: an unknown ``platform``.
    """
    return scoped(_config, "target", platform_backend(platform))


def platform_backend(platform: str) -> str:
    """The backend (one of :data:`BACKENDS`) of a backend or ``jax.export`` platform name.

    Raises:
        ValueError: an unknown ``platform``.
    """
    name = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform) if isinstance(platform, str) else None
    if name not in BACKENDS:
        raise ValueError(f"platform={platform!r}: expected one of {BACKENDS}, 'cuda' or 'rocm'")
    return name


def forward_mode() -> contextlib.AbstractContextManager:
    """Within the block, the convs traced take none of the three routes that are reverse mode only
    (custom VJPs whose automatic transposes would be slow), so ``jax.jvp`` and ``jax.jacfwd`` work
    through them: the factorized path's tiles (:func:`tile_plan`, whatever
    :func:`tile_rows_mode` says), the chunks of large 2-D dense convs (:func:`dense_chunk`,
    whatever :func:`dense_chunks_mode` says) and the matrix-product kernel gradients
    (:func:`hocp_jax.autotune.choose_kernel_grad`, also in a :func:`loop_mode` block). Only the
    CPU backend takes them, where the rules' thresholds call for them (tiles from
    :data:`TILE_MIN_BYTES` of intermediate per sample of a 3-D conv, chunks from
    :data:`DENSE_CHUNK_MIN_BYTES` of 2-D input on hosts with :data:`DENSE_CHUNK_CPU_FLAGS`); everything else has forward mode everywhere,
    the loops over samples and chunks of samples included. Reverse mode works in the block too,
    without those routes' savings. Read at trace time, like :func:`per_sample_mode`: a function
    that ``jax.jit`` traced before the block keeps its program."""
    return scoped(_config, "forward_mode", True)


def forward_mode_on() -> bool:
    """Whether the trace is in a :func:`forward_mode` block."""
    return _config["forward_mode"]


def per_device_mode(value: bool | None) -> contextlib.AbstractContextManager:
    """Within the block, :func:`program_per_device` answers ``value`` (``None``: from the trace):
    :mod:`hocp_jax.autotune` times a conv's programs outside that conv's trace, with its loops."""
    return scoped(_config, "per_device", automatic_flag(value, "value"))


def check_automatic_flag(value, name: str) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is ``None`` (the automatic rule) or a Python bool
    (not a NumPy one, which a caller that keeps ``value`` as given would find ``is not False``:
    :func:`automatic_flag` converts one)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected None (automatic), True or False")


def automatic_flag(value, name: str) -> bool | None:
    """``value`` as ``None`` or a Python bool, taking a NumPy bool too (as
    :func:`hocp_jax.checks.check_flags` does); else :func:`check_automatic_flag`'s ``ValueError``. What the
    ``*_mode`` blocks store: the rules compare with ``is False``, which a NumPy bool never is."""
    value = bool(value) if isinstance(value, np.bool_) else value
    check_automatic_flag(value, name)
    return value


def check_batch_shards(value, name: str) -> int | None:
    """``value`` (``None`` or a positive number of devices) as ``None`` or an int; else a ``ValueError``
    naming ``name``."""
    if value is not None and not is_positive_int(value):
        raise ValueError(f"{name}={value!r}: expected None or a positive number of devices")
    return None if value is None else int(value)


def batch_shards_mode(value: int | None) -> contextlib.AbstractContextManager:
    """Within the block, :func:`hocp_jax.autotune.configure`'s ``batch_shards`` reads ``value``
    (read at trace time, like :func:`per_sample_mode`); :func:`hocp_jax.training.sharding.on_mesh`
    traces a step in such a block with its mesh's size."""
    return scoped(_config, "batch_shards", check_batch_shards(value, "value"))


def is_static(shape: Sequence[Any]) -> bool:
    """Whether every dimension of ``shape`` is a number, not a symbolic dimension of
    ``jax.export``'s shape polymorphism (e.g. a batch ``"b"``). The loops over samples, chunks and
    tiles need static sizes, and the rules cannot compare a symbolic one with their thresholds:
    where a conv's input has a symbolic dimension, the rules answer as on GPU/TPU (whole batch,
    ``lax``'s convolutions; no loop, patches or matrix-product kernel gradient), and
    :func:`hocp_jax.autotune.choose_cp` counts a symbolic dimension as its smallest size."""
    return all(is_int(d) for d in shape)


def device_shape(x_shape: Sequence[int], batch_shards: int | None = None) -> tuple[int, ...]:
    """``x_shape`` with the batch one device runs, ``ceil(B / n)``: ``n`` = ``batch_shards`` (the
    split of the traced array's batch axis, :func:`hocp_jax.explicit_sharding.shards`) if given,
    else :func:`hocp_jax.autotune.configure`'s ``batch_shards`` (not inside a ``shard_map`` over
    every axis, where the traced batch is one device's), else 1."""
    n = batch_shards or (None if _in_shard_map() else _config["batch_shards"]) or 1
    return (-(-x_shape[0] // n), *x_shape[1:])


def program_per_device() -> bool:
    """Whether the conv being traced runs as a program of its own on each device's samples: with
    one device, or inside ``jax.shard_map`` over every axis of its mesh (then ``x`` is the device's
    share). The automatic per-sample, chunk and tile loops need it: under ``jit`` with the batch
    split across devices, a loop over the batch would run the devices one after another (there
    :func:`batch_split` moves a CP conv into ``shard_map`` where it can tell the split). Two host
    devices, the Jester stack under ``shard_map`` (``python -m benchmarks.experiments host_devices
    15``, benchmarks/EXPERIMENTS.md, stop 52): before this rule, conv2's ``auto`` path took 4923 ms
    on each device's whole share and 1009 ms forced one sample at a time (no tiles), the stack 5894
    and 1804 ms; with it (per sample and in tiles), conv2 735 ms and the stack 1415 ms."""
    if _config["per_device"] is not None:  # per_device_mode: the measured autotune timing a conv
        return _config["per_device"]
    return jax.device_count() == 1 or _in_shard_map()


def loops_apply() -> bool:
    """Whether the automatic per-sample, chunk and tile loops (:func:`per_sample_default`,
    :func:`batch_chunk_default`, :func:`tile_plan`) may run in the conv being traced: on the CPU
    backend, in a program of its own per device (:func:`program_per_device`)."""
    return backend() == "cpu" and program_per_device()


def _in_shard_map() -> bool:
    """Whether the trace is inside ``jax.shard_map`` over every axis of its mesh, where an array is
    one device's share."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.are_all_axes_manual


def batch_split(x, params: Mapping[str, Any]) -> tuple[Any, tuple[str, ...]] | None:
    """``(mesh, axes)`` when :func:`hocp_jax.conv.cp_conv` should run as a program of its own on
    each device's samples, inside ``jax.shard_map`` with ``x``'s batch split over ``axes`` of
    ``mesh`` and ``params`` on every device, so that its per-sample, chunk and tile loops
    (:func:`program_per_device`) apply under ``jit`` with a split batch; else ``None``.

    On the CPU backend, outside a ``shard_map`` over every axis, with the mesh in context
    (``jax.set_mesh``; abstract, as at trace time) and a batch that divides over the split, either
    * explicit axes: ``x``'s type splits its batch axis and nothing else, ``params`` split nothing;
    * auto axes (``train.py``'s mesh): ``x``'s type splits nothing, every axis is auto and
      ``batch_shards`` (:func:`hocp_jax.autotune.configure`, :func:`batch_shards_mode`) is the
      mesh's size: the batch is split over all of it.
    The conv is the same function on any split of the batch, so the wrong guess of a layout
    costs a reshard, never a wrong value. Measured on two host devices (``python -m
    benchmarks.experiments jit_devices 25``, benchmarks/EXPERIMENTS.md, stop 53): ``bench``'s
    Jester HO-CP train step (2 clips) under ``jit`` took 638 ms with this and 812 ms without."""
    from hocp_jax import explicit_sharding

    mesh = jax.sharding.get_abstract_mesh()
    if backend() != "cpu" or mesh.empty or program_per_device() or mesh.manual_axes:
        return None
    spec = explicit_sharding.spec_of(x)
    if spec[0] is not None:
        if any(a is not None for a in spec[1:]) or any(explicit_sharding.is_split(p) for p in params.values()):
            return None
        axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    elif mesh.are_all_axes_auto and _config["batch_shards"] == mesh.size and not explicit_sharding.is_split(x):
        axes = tuple(mesh.axis_names)
    else:
        return None
    n = int(np.prod([mesh.shape[a] for a in axes]))
    return (mesh, axes) if n > 1 and x.shape[0] % n == 0 else None


def loop_mode() -> contextlib.AbstractContextManager:
    """Within the block, the convs traced are in a loop's body (``lax.scan``: the micro-batches of
    :func:`hocp_jax.training.step.make_train_step`); on the CPU backend (:func:`cpu_loop_mode`) the library's
    ungrouped convs, of computed kernels and dense ones alike, then run XLA's forward convolution with
    gradients that need none of XLA's gradient convolutions (:func:`hocp_jax.conv_ops.conv_matmul_kernel_grad`:
    the kernel gradient as one matrix product per tap, the input gradient as a forward conv of the flipped
    kernel, or per tap if strided; a custom VJP: reverse mode only, ``jax.jvp`` through them raises in the
    block), untimed. XLA's CPU backend runs its gradient convolutions far slower inside a loop (stop 59: a 3x3
    conv, 64 -> 64 channels, on 32x32x32x64 inputs, kernel gradient 6.42 s in a scan of two against 0.10 s
    unrolled, input gradient 0.20 s against 0.08 s; stop 60: a 3x3x3 conv, 64 -> 128 channels, on 4x9x42x42x64
    inputs, kernel gradient 20.8 s against 0.38 s), and measured picks are cached apart
    (:func:`hocp_jax.autotune.cache_key`). Read at trace time, like :func:`per_sample_mode`: a function that
    ``jax.jit`` traced before (or inside) the block keeps that program outside (or inside) it."""
    return scoped(_config, "in_loop", True)


def cpu_loop_mode() -> bool:
    """Whether the conv being traced is in a :func:`loop_mode` block on the CPU backend (and not in
    a :func:`forward_mode` block)."""
    return _config["in_loop"] and backend() == "cpu" and not _config["forward_mode"]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags as Linux lists them (``/proc/cpuinfo``); empty where that
    file cannot be read (other systems)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


CACHE_SIZE_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3}


@functools.cache
def l2_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Bytes of the level-2 data (or unified) cache of the first CPU as Linux lists it under
    ``root`` (sysfs: ``index*/level``, ``type``, ``size`` such as ``2048K``), or ``None`` where
    that cannot be read (other systems, no such cache)."""
    try:
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            if not entry.startswith("index"):
                continue
            with open(os.path.join(path, "level")) as f_level, open(os.path.join(path, "type")) as f_type:
                if f_level.read().strip() != "2" or f_type.read().strip() not in ("Data", "Unified"):
                    continue
            with open(os.path.join(path, "size")) as f:
                size = f.read().strip()
            return int(size[:-1]) * CACHE_SIZE_UNITS[size[-1]] if size[-1:] in CACHE_SIZE_UNITS else int(size)
    except (OSError, ValueError):
        pass
    return None


def host_kind() -> str:
    """The host as the CPU rules see it: the machine, which of AVX2 / AVX-512 / AMX its CPU lists
    (AMX: :data:`DENSE_CHUNK_CPU_FLAGS`) and its L2 size per core (:func:`l2_cache_bytes`, which sizes the tiles: :func:`tile_target_bytes`);
    part of the cache keys, so picks timed on one kind of host are not reused on another."""
    flags = cpu_flags()
    l2 = l2_cache_bytes()
    return " ".join([platform.machine().lower()] + [f for f in ("avx2", "avx512f", *DENSE_CHUNK_CPU_FLAGS) if f in flags]
                    + ([f"l2={l2 // 1024}K"] if l2 else []))


def upcast_mode(value: bool | None) -> contextlib.AbstractContextManager:
    """Within the block, :func:`compute_dtype` computes in float32 for floating dtypes narrower
    than 32 bits (``True``), never (``False``), or by its automatic rule (``None``). Read at trace
    time, like :func:`per_sample_mode`."""
    return scoped(_config, "upcast", automatic_flag(value, "value"))


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype in which :func:`hocp_jax.conv.cp_conv`'s factorized path computes its
    intermediates when its input and factors promote to ``dtype`` (its output keeps ``dtype``):
    float32 for a floating ``dtype`` narrower than 32 bits (bfloat16, float16) on the CPU
    backend, else ``dtype`` (GPU/TPU compute in it; :func:`upcast_mode` overrides the rule).

    XLA CPU has no faster low-precision arithmetic: it runs the depthwise passes and matrix
    products of bfloat16 arrays slower than float32 ones. Measured on the 2-core CPU with AVX-512
    (benchmarks/EXPERIMENTS.md, stop 42, ``python -m benchmarks.experiments low_precision 5``, the
    benchmark's 18 layers fwd+bwd from bfloat16 inputs and weights): float32 intermediates took
    0.61-1.09x (median 0.87) the time of bfloat16 arithmetic, which took 0.80-1.61x (median 1.22)
    the float32 layer's; what remains is the casts at the layer's boundary. The
    intermediates live one sample (or tile, or chunk) at a time on one CPU device
    (:func:`batch_plan`), so their float32 width costs little memory; the result is at least as
    precise as bfloat16 arithmetic. The dense and reconstructed paths' convolutions ran as fast
    in bfloat16 as in float32 and keep ``dtype``."""
    dtype = jnp.dtype(dtype)
    narrow = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4
    upcast = _config["upcast"]
    if upcast is None:
        upcast = backend() == "cpu"
    return jnp.dtype(jnp.float32) if narrow and upcast else dtype


PATCHES_MAX_IN_CHANNELS = 4
"""Most input channels of a conv over 3 or more spatial modes that the CPU backend runs as one
matrix product of its patches (:func:`patches_conv`): a video network's first conv, on RGB or
grey frames. XLA CPU's 3-D convolution runs such channel-starved convs far below its rate on
wider ones (:data:`hocp_jax.counting.CONV_3D_SLOWDOWN`). Measured in ``bench``'s train steps
with the first conv as patches (``python -m benchmarks.experiments input_patches 11``, stop 49,
benchmarks/EXPERIMENTS.md): the dense 3-D ResNet-18 step took 0.92-0.94x the time, the Jester
dense net's 0.84-0.85x, the transduced HO-CP ResNet-18's (stem on its reconstructed path)
0.80-0.81x; the 2-D ResNet-18 steps took 0.98-1.04x, so 2-D convs keep ``lax``'s."""
PATCHES_MAX_BYTES = 1024**3
"""Largest patches matrix (per device, estimated as ``B * prod(ceil(S / stride)) * prod(K) * C_in``
elements) :func:`patches_conv` builds; a larger conv keeps ``lax``'s convolution. The patches hold
``prod(K) * C_in`` values per output position (81 for the Jester net's 3x3x3 conv of RGB clips,
441 for the ResNet-18 3-D stem's 3x7x7 one, whose output is strided), kept for the kernel
gradient, against ``C_in`` of the input ``lax``'s conv keeps: for ``bench``'s steps XLA's
temporary buffers went from 79.9 to 121.0 MiB (dense 3-D ResNet-18, one clip) and from 276.8 to
352.4 MiB (Jester dense, two clips), and down from 559.1 to 328.9 MiB for the transduced step,
whose factorized stem's intermediates are gone (stop 49, scratch, ``memory_analysis()``)."""


def patches_fit(x_shape: Sequence[int], dtype, kernel_shape: Sequence[int], strides: Sequence[int],
                batch_shards: int | None = None) -> bool:
    """Whether a channels-last, ungrouped conv of ``x (B, *S, C_in)`` (as traced; the batch one
    device runs counts, :func:`device_shape`) with ``kernel (*K, C_in, C_out)`` is of the kind the
    CPU backend runs as one matrix product of its patches (:func:`patches_conv`), whatever the
    backend: 3 or more spatial modes, a kernel that is not pointwise, at most
    :data:`PATCHES_MAX_IN_CHANNELS` input channels, patches of at most :data:`PATCHES_MAX_BYTES`.
    The CPU cost model (:func:`hocp_jax.counting.cp_path_costs`) reads it."""
    n = len(kernel_shape) - 2
    if (n < 3 or all(k == 1 for k in kernel_shape[:n]) or kernel_shape[-2] > PATCHES_MAX_IN_CHANNELS
            or not is_static(x_shape)):
        return False
    b, *sizes = device_shape(x_shape, batch_shards)[:-1]
    positions = b * int(np.prod([-(-s // st) for s, st in zip(sizes, strides)]))
    return positions * int(np.prod(kernel_shape[:-1])) * jnp.dtype(dtype).itemsize <= PATCHES_MAX_BYTES


def patches_conv(x_shape: Sequence[int], dtype, kernel_shape: Sequence[int], strides: Sequence[int],
                 batch_shards: int | None = None) -> bool:
    """Whether :func:`hocp_jax.conv_ops.conv_general_dilated` and the convs of computed kernels (the
    CP reconstructed path, :func:`hocp_jax.conv_ops.weight_conv`) run a channels-last, ungrouped
    conv as one matrix product of its explicit patches (:func:`hocp_jax.conv_ops._patches_conv`):
    on the CPU backend, where :func:`patches_fit` says so. GPU/TPU keep their vendor-tuned
    convolutions (not measured against it)."""
    return backend() == "cpu" and patches_fit(x_shape, dtype, kernel_shape, strides, batch_shards)


PATCHES_SPLIT_MIN_COLUMNS = 36
"""Fewest in-plane patch columns (input channels times the taps of the modes after the first)
for which :func:`patches_split` splits a patches product by the first mode's taps: the smallest
measured gain (4 channels under a 3x3x3 kernel); 27 columns (an RGB clip under one) lost."""


def patches_split_mode(value: bool | None) -> contextlib.AbstractContextManager:
    """Within the block, :func:`patches_split` splits wherever the kernel has more than one tap
    along its first mode (``True``), never (``False``), or by its automatic rule (``None``). Read
    at trace time, like :func:`per_sample_mode`."""
    return scoped(_config, "patches_split", automatic_flag(value, "value"))


def patches_split(in_channels: int, kernel_size: Sequence[int]) -> bool:
    """Whether :func:`hocp_jax.conv_ops._patches_conv` builds the patches over the modes after the
    first only, at every position of the (padded) first mode, and runs one matrix product per tap
    of the first mode on its slice of them (summed in float32 or wider), instead of one product
    of the full patches: when the first mode has more than one tap, the input at most
    :data:`PATCHES_MAX_IN_CHANNELS` channels (the convs the library runs as patches,
    :func:`patches_conv`; the benchmark's patches baseline of wider convs keeps one product) and
    the in-plane columns ``C_in prod(K[1:])`` are at least :data:`PATCHES_SPLIT_MIN_COLUMNS`,
    whatever the strides. :func:`patches_split_mode` turns it on or off.

    The full patches repeat each in-plane patch once per tap of the first mode (3 times for a
    3x7x7 kernel): a matrix that, for a video network's stem, is written and read from memory,
    where the split one is a third of it and the products have the same FLOPs. Stop 65, on the
    2-core AMD EPYC host, fwd + kernel gradient (no input gradient), 64 output channels, split /
    one product (``python -m benchmarks.experiments patches_split 9``, benchmarks/EXPERIMENTS.md):
    the ResNet-18 3-D stem's conv (3 input channels, 3x7x7, stride (1, 2, 2), 147 columns) on one
    8x112x112 clip 0.67x, on two 16x112x112 clips 0.61x; 5x7x7 0.53x; 3x5x5 (75 columns) 0.78x,
    and 0.71x at stride 1 on 16x56x56; one input channel under 3x7x7 (49 columns) 0.68x; 4
    channels under 3x3x3 (36 columns) 0.94x; 3x7x7 with stride 2 on the first mode too 0.86x; 3
    channels under 3x3x3 (27 columns, the Jester conv1's shape) 0.98x, and 0.98x with stride (1, 2,
    2) (scratch runs before it: 1.02x and 1.10x, so those keep one product). In ``bench``'s train
    steps: the transduced HO-CP ResNet-18 (its stem's reconstructed path) 0.94x per round, the
    dense 3-D one 0.98x."""
    if len(kernel_size) < 2 or kernel_size[0] < 2 or _config["patches_split"] is False:
        return False
    return bool(_config["patches_split"]) or (in_channels <= PATCHES_MAX_IN_CHANNELS and
                                              in_channels * int(np.prod(kernel_size[1:])) >= PATCHES_SPLIT_MIN_COLUMNS)


def small_map_taps(x_shape: Sequence[int], kernel_shape: Sequence[int], dilations: Sequence[int] | None = None) -> bool:
    """Whether :func:`hocp_jax.conv_ops.conv_general_dilated` (the models' dense convs) and
    :func:`hocp_jax.conv_ops.weight_conv` (the convs of computed kernels: reconstructed CP, Tucker and
    TT kernels) run a channels-last, ungrouped conv of ``x (B, *S, C_in)``
    with ``kernel (*K, C_in, C_out)`` as one matrix product per tap that reads ``x``
    (:func:`hocp_jax.conv_ops._taps_conv`): on the CPU backend, when a spatial mode of ``x`` is
    shorter than the kernel's extent ``d (k - 1) + 1`` (``dilations`` default 1).

    XLA's CPU convolution is pathologically slow there. Stop 60, ``python -m benchmarks.experiments
    small_maps 5`` (benchmarks/EXPERIMENTS.md), fwd+bwd on the 2-core AMD EPYC host: the taps took
    0.012-0.208x XLA's time on the 18 2-D maps smaller than their 3x3, 5x5 or 7x7 kernel (a 2x2
    map of 64 x 512 channels under a 3x3 kernel, the last stage of a ResNet-18 on 64x64 images:
    22.3 ms against 1065.0) and 0.036-0.908x on the 8 clips of fewer frames than a 3x3x3 kernel
    (or smaller maps), and 0.78-1.60x on the 10 2-D maps as large as the kernel or larger, where
    XLA's stays (the taps took 0.85-0.97x on the 4 such clips: a small gain not taken). With a
    kernel rebuilt from CP factors (stop 61, ``small_maps_computed 5``): 0.18x and 0.61x on that
    2x2 map at batch 64 and 8, 1.00x and 1.04x on two clips of 2 frames. GPU/TPU keep their
    vendor-tuned convolutions (not measured)."""
    if backend() != "cpu":
        return False
    n = len(kernel_shape) - 2
    ds = tuple(dilations) if dilations is not None else (1,) * n
    return any(is_static((size,)) and size < d * (k - 1) + 1 for size, k, d in zip(x_shape[1:1 + n], kernel_shape[:n], ds))


KERNEL_GRAD_MATMUL_MIN_BYTES = 32 * 1024 * 1024
"""On AVX-512 hosts, the smallest (per-device) conv input for which :func:`matmul_kernel_grad`
takes matrix-product kernel gradients. Measured on a 2-core AMD EPYC with AVX-512 (32 MiB L3;
benchmarks/EXPERIMENTS.md, stop 41, ``python -m benchmarks.experiments kernel_grad_batches 7``:
ResNet-18's seven 3x3 convs, CP reconstructed path, batch 16-96 of 224-pixel and 64-128 of
112-pixel images): products / XLA's kernel gradient 0.74-0.88x on the 8 convs with inputs of
32 MiB or more, 0.85-1.11x (median 0.98) on the 10 with 16-32 MiB, 0.86-1.24x (median 1.03) on
the 31 smaller ones; a scratch run before it read 0.57-0.80x on 8 of 8 convs from 36.8 MiB."""


def matmul_kernel_grad(x_shape: Sequence[int], dtype) -> bool:
    """Whether a 2-D conv of a computed or trained kernel (the CP, Tucker and TT reconstructed
    paths, the Tucker core, the TT mode kernels) on ``x`` of ``x_shape`` (as traced; the batch one
    device runs counts, :func:`device_shape`) and ``dtype`` takes its kernel gradient as one matrix
    product per tap (:func:`hocp_jax.conv_ops.conv_matmul_kernel_grad`) instead of XLA's
    kernel-gradient convolution, without timing: on the CPU backend of an x86-64 host whose CPU
    lists AVX2 but not AVX-512, and of one with AVX-512 when ``x`` holds at least
    :data:`KERNEL_GRAD_MATMUL_MIN_BYTES`. The measured policy times both instead
    (:func:`hocp_jax.autotune.choose_kernel_grad`).

    Measured on two 2-core AMD EPYC hosts (benchmarks/EXPERIMENTS.md, stops 39-41; ``python -m
    benchmarks.experiments kernel_grad``, ``kernel_grad_batches`` and ``tucker_tt_kernel_grad``).
    With AVX2 only, XLA's kernel-gradient convolution ran far below matrix-product speed: the
    products took 0.63-0.91x the reconstructed CP path's time on five of ResNet-18's seven 3x3 conv
    shapes at batch 8 (0.97x, 1.17x on the other two) and 0.2-0.6x at batch 32-64. With AVX-512,
    the products gained or lost on inputs under 32 MiB (0.85-1.28x the CP path's time on those
    shapes at batch 8-128, 0.87-1.60x the Tucker paths' at batch 8 and 32; 1.09x the time in the
    HO-CP ResNet-18 2-D train step) and won on larger ones (:data:`KERNEL_GRAD_MATMUL_MIN_BYTES`;
    the Tucker and TT reconstructed paths at batch 64 too: 0.70-0.77x on the two 49 MiB inputs).
    Other hosts (and GPU/TPU) keep XLA's: not measured; the measured policy times both."""
    if (backend() != "cpu" or platform.machine().lower() not in ("x86_64", "amd64")
            or not is_static(x_shape)):
        return False
    flags = cpu_flags()
    if "avx2" not in flags:
        return False
    if "avx512f" not in flags:
        return True
    return int(np.prod(device_shape(x_shape))) * jnp.dtype(dtype).itemsize >= KERNEL_GRAD_MATMUL_MIN_BYTES


DENSE_CHUNK_MIN_BYTES = 3 * 1024 * 1024
"""Smallest (per-device) input of a 2-D conv of more than :data:`PATCHES_MAX_IN_CHANNELS` input
channels that :func:`dense_chunk` runs in chunks of samples."""
DENSE_CHUNK_STEM_MIN_BYTES = 1024 * 1024
"""The same for a stem's conv (at most :data:`PATCHES_MAX_IN_CHANNELS` input channels)."""
DENSE_CHUNK_TARGET_BYTES = 256 * 1024
"""Most input per chunk of samples of :func:`dense_chunk` (one sample when a single one is larger)."""
DENSE_CHUNK_CPU_FLAGS = ("amx_tile",)
"""CPU flags (``/proc/cpuinfo``) of the hosts on which :func:`dense_chunk`'s automatic rule runs
chunks: AMX, which Intel's Xeons list since Sapphire Rapids. The chunks won on one such host (the
2-core Intel Xeon VM with AVX-512 and AMX, stop 69) and lost on one without (the 2-core AMD EPYC
VM with AVX-512, stop 75: on 4 of the 5 3x3 convs and all 4 stems the rule took, in each of two
runs); other CPUs were not measured, and keep XLA's whole-batch conv."""
DENSE_CHUNK_MAX_CHANNELS_PER_POSITION = 0.5
"""Most input plus output channels per output position of a chunk for :func:`dense_chunk`: each
step of its loop adds a whole kernel gradient, ``K^2 C_in C_out`` values, computed from the
chunk's positions alone."""


def dense_chunks_host() -> bool:
    """Whether the host's CPU lists every flag of :data:`DENSE_CHUNK_CPU_FLAGS` (where
    :func:`dense_chunk`'s automatic rule runs chunks)."""
    return all(f in cpu_flags() for f in DENSE_CHUNK_CPU_FLAGS)


def dense_chunks_mode(value: bool | None) -> contextlib.AbstractContextManager:
    """Within the block, :func:`dense_chunk` runs the 2-D convs its rule allows in chunks
    (``None``, the default), none (``False``), or every conv of two or more samples it may
    (``True``: the 2-D, byte and channel bounds off; tests, experiments). Read at trace time, like
    :func:`per_sample_mode`."""
    return scoped(_config, "dense_chunks", automatic_flag(value, "value"))


def dense_chunk(x_shape: Sequence[int], out_channels: int, strides: Sequence[int], dtype) -> int | None:
    """Samples per step of the loop in which :func:`hocp_jax.conv_ops.conv_general_dilated` runs an
    ungrouped channels-last 2-D conv of ``x (B, H, W, C_in)`` to ``out_channels`` with ``strides``
    (a dense conv of the models, or one of a rebuilt kernel:
    :func:`hocp_jax.conv_ops.conv_general_dilated`, ``hocp_jax.conv_ops.weight_conv``) on the CPU
    backend, or ``None`` (the whole batch at once, XLA's conv): on a CPU that lists
    :data:`DENSE_CHUNK_CPU_FLAGS`, with one program per device
    (:func:`loops_apply`), outside a :func:`loop_mode` or :func:`forward_mode` block, ``B > 1`` and an input of at least
    :data:`DENSE_CHUNK_MIN_BYTES` (:data:`DENSE_CHUNK_STEM_MIN_BYTES` with at most
    :data:`PATCHES_MAX_IN_CHANNELS` input channels: a network's stem), in chunks of the most samples
    that divide ``B`` and hold at most :data:`DENSE_CHUNK_TARGET_BYTES` of input (at least one
    sample), unless the chunk's output positions (``ceil(H / s) * ceil(W / s)`` per sample) are too
    few for its channels (:data:`DENSE_CHUNK_MAX_CHANNELS_PER_POSITION`). Each chunk runs the loop
    mode's conv (XLA's forward convolution, the kernel gradient as one matrix product per tap, the
    input gradient without XLA's transposed conv).

    XLA's CPU convolution slows down more than its work grows past a few MiB of input (stop 69, on
    the Intel host: a 3x3 conv, 64 -> 64 channels, batch 8, fwd+bwd 10.6 ms on 28x28 maps and 77.8
    ms on 56x56 ones). ``python -m benchmarks.experiments dense_chunks 5`` (stop 69,
    benchmarks/EXPERIMENTS.md; three runs), chunks against XLA's whole-batch conv, fwd+bwd:
    0.68-0.96x on the five 3x3 convs the rule takes (3-12 MiB of input), 0.75-0.97x on the 7x7 stems
    of 3 channels it takes (1.2-4.6 MiB) and 0.96-1.04x on the one it leaves (0.75 MiB); 1.19-1.39x
    on the other convs it leaves (a 14x14 map of 256 channels, inputs of 1.5-2 MiB, and, third run,
    a stride-2 conv of 64 -> 128 channels on 16x16 maps in chunks of 4, 1.27x: 0.75 channels per
    position, hence the bound of 0.5); Jester conv2's 3-D shape 1.00-1.01x (so 3-D convs keep
    XLA's). On the AMD EPYC VM (stop 75, two runs of the same experiment) the chunks took
    1.08-1.45x and 0.90-1.14x XLA's time on the five 3x3 convs (4 of 5 over 1.0 in each run) and
    1.20-1.31x on the four stems the rule took there, hence :data:`DENSE_CHUNK_CPU_FLAGS`. :func:`dense_chunks_mode` overrides the host and size rules."""
    setting = _config["dense_chunks"]
    batch = x_shape[0]
    if (setting is False or not is_static(x_shape) or batch < 2 or _config["in_loop"] or not loops_apply()
            or _config["forward_mode"] or setting is None and (len(x_shape) != 4 or not dense_chunks_host())):
        return None
    sample = int(np.prod(x_shape[1:])) * jnp.dtype(dtype).itemsize
    k = max(k for k in range(1, batch) if batch % k == 0 and (k == 1 or k * sample <= DENSE_CHUNK_TARGET_BYTES))
    positions = int(np.prod([-(-size // s) for size, s in zip(x_shape[1:-1], strides)]))
    stem = x_shape[-1] <= PATCHES_MAX_IN_CHANNELS
    small = batch * sample < (DENSE_CHUNK_STEM_MIN_BYTES if stem else DENSE_CHUNK_MIN_BYTES)
    if setting is None and (small or x_shape[-1] + out_channels > DENSE_CHUNK_MAX_CHANNELS_PER_POSITION * k * positions):
        return None
    return k


PAIRED_ROWS_IN_CHANNELS = (2, 6)
"""Fewest and most input channels of a product whose rows :func:`paired_rows` pairs."""
PAIRED_ROWS_MAX_OUT = 24
"""Most output channels of a product whose rows :func:`paired_rows` pairs."""


def paired_rows_mode(value: bool | None) -> contextlib.AbstractContextManager:
    """Within the block, :func:`paired_rows` answers ``value`` for every product it is asked about
    whose rows pair up (``None``: the automatic rule). Read at trace time, like
    :func:`per_sample_mode`."""
    return scoped(_config, "paired_rows", automatic_flag(value, "value"))


def paired_rows(in_channels: int, out_channels: int, row_length: int) -> bool:
    """Whether :func:`hocp_jax.conv_ops.channel_matmul` runs its ``(N, C) x (C, R)`` product as
    ``(N / 2, 2C) x (2C, 2R)`` with the block-diagonal ``[[U, 0], [0, U]]`` (two neighbouring
    positions per row; the same values): on the CPU backend, for ``C`` in
    :data:`PAIRED_ROWS_IN_CHANNELS` and ``R`` at most :data:`PAIRED_ROWS_MAX_OUT`, when the last
    spatial size ``row_length`` is even (so a pair never spans two rows or samples).
    :func:`paired_rows_mode` overrides the channel rule. The paired product does twice the
    multiply-adds, half of them with the zero blocks, and XLA's cost analysis counts them all.

    XLA CPU runs a product of so few input and output channels far below its speed, such as the
    input contraction of an RGB network's first CP layer (3 -> rank 18 on the Jester net). Stop 63,
    ``python -m benchmarks.experiments channel_pairs 11`` (benchmarks/EXPERIMENTS.md), on the
    2-core AMD EPYC host, a loop over 48 tiles of 24192 positions running the product and its
    weight gradient, paired / one product: 3 input channels 0.31-0.54 for ``R`` = 8 to 24 (0.31
    at 3 -> 18), 0.93-1.23 for 32 to 128; 2, 4 and 6 input channels 0.51-0.93 for ``R`` <= 24 (but
    4 -> 16: 1.14), 0.77-1.62 beyond; 1 input channel (a broadcast product for XLA) 1.01-2.81.
    Jester conv1's factorized path fwd+bwd (tiles of 14 rows) in 0.945x its time; the Jester HO-CP
    net's train step 1.02x, inside that step's spread. GPU/TPU keep one product (not measured)."""
    if row_length % 2 or backend() != "cpu":
        return False
    if _config["paired_rows"] is not None:
        return _config["paired_rows"]
    fewest, most = PAIRED_ROWS_IN_CHANNELS
    return fewest <= in_channels <= most and out_channels <= PAIRED_ROWS_MAX_OUT


def _sample_bytes(x_shape: Sequence[int], rank: int, dtype) -> int:
    """Bytes of one sample's ``(1, *S, R)`` intermediate of the factorized path, in
    :func:`compute_dtype` (what the per-sample, chunk and tile plans size)."""
    return int(np.prod(x_shape[1:-1])) * rank * compute_dtype(dtype).itemsize


PER_SAMPLE_MIN_BYTES = 256 * 1024
"""Smallest per-sample ``(1, *S, R)`` intermediate for which :func:`per_sample_default` turns
the per-sample loop on: below it (test-size shapes, the last stages of a network) the loop's
fixed cost outweighs the smaller working set. A rough bound, not a fine calibration."""


def per_sample_mode(value: bool | None) -> contextlib.AbstractContextManager:
    """Within the block, :func:`per_sample_default` answers ``value and batch > 1`` (``None``:
    the automatic rule). Read at trace time, so it applies to functions traced in the block
    (e.g. a model whose layers do not expose ``per_sample``); ``jax.jit`` keys its cache on the
    function and argument shapes, not on this setting, so a function traced before the block
    keeps its earlier program."""
    return scoped(_config, "per_sample", automatic_flag(value, "value"))


def per_sample_default(x_shape: Sequence[int], rank: int, dtype) -> bool:
    """Whether the factorized CP path on ``x (B, *S, C)`` runs one sample at a time when the caller
    does not say (:func:`hocp_jax.conv.cp_conv` ``per_sample=None``): as set by
    :func:`per_sample_mode`, else on the CPU backend with one program per device
    (:func:`program_per_device`), ``B > 1``, three or more
    modes (spatio-temporal convs) and a per-sample intermediate ``prod(S) * rank`` (in
    :func:`compute_dtype`, as for every plan here) of at least :data:`PER_SAMPLE_MIN_BYTES`.

    Measured on the 2-core CPU (benchmarks/EXPERIMENTS.md): per sample, the Jester stack fwd+bwd takes
    0.78x the time of the whole-batch program (``python -m benchmarks.experiments layout 3``),
    because a sample's intermediates are 1/B of the working set of the memory-bound depthwise
    passes. The HO-CP ResNet-18 2-D train step is slower with it (``python -m
    benchmarks.experiments per_sample 15``: 0.94x dense whole batch, 1.20x per sample), so 2-D
    convs run per sample only in the chunks of :func:`batch_chunk_default`. On GPU/TPU a sequential
    loop would idle the device, and under ``jit`` with the batch split across devices the loop would
    run them one after another, so it is off there (where :func:`batch_split` can tell the split,
    :func:`hocp_jax.conv.cp_conv` runs each device's share in a program of its own instead).
    """
    batch = x_shape[0]
    if not is_static(x_shape):
        return False
    if _config["per_sample"] is not None:
        return bool(_config["per_sample"]) and batch > 1
    per_sample_bytes = _sample_bytes(x_shape, rank, dtype)
    return (batch > 1 and len(x_shape) >= 5 and per_sample_bytes >= PER_SAMPLE_MIN_BYTES
            and loops_apply())


CHUNK_MIN_BYTES = 6 * 1024 * 1024
"""Smallest whole-batch ``(B, H, W, R)`` intermediate of a 2-D factorized CP conv for which
:func:`batch_chunk_default` runs the batch in chunks of samples."""
CHUNK_TARGET_BYTES = 2 * 1024 * 1024
"""Largest ``(k, H, W, R)`` intermediate of a chunk of ``k`` samples (:func:`batch_chunk_default`;
one sample when a single sample's is larger)."""


CHUNK_MAX_GRAD_RATIO = 4
"""Most input plus output channels per output position of a chunk for which
:func:`batch_chunk_default` runs the batch in chunks: each step of the loop computes and adds up
the factor gradients, ``(C_in + C_out) * rank`` values, from its chunk's ``k * H' * W'`` output
positions, so with few positions per chunk that work outweighs the cache gain. Measured on the
2-core CPU (benchmarks/EXPERIMENTS.md, stop 30: two runs of ``python -m benchmarks.experiments
chunk_rule``, ResNet-18's 3x3 convs on 8-16 images of 224 and 32-64 of 112 pixels, fwd+bwd,
chunks against the whole batch, interleaved): 0.49-0.95x at 0.04-3.9 channels per chunk position
(20 shapes), 0.89-1.08x at 5.2-15.7 (the (256->512)/s2 and (512->512) convs, 6 shapes), which
also ran slower in chunks in the benchmark's runs of that stop; those now run on the whole
batch."""


def batch_chunk_default(x_shape: Sequence[int], y_shape: Sequence[int], rank: int, dtype) -> int | None:
    """Samples per step of the loop over the batch in which the factorized path of a 2-D CP conv
    from ``x (B, H, W, C_in)`` to ``y (B, H', W', C_out)`` runs when the caller does not say, or
    ``None`` (the whole batch at once).

    On the CPU backend with one program per device (:func:`program_per_device`) and no
    :func:`per_sample_mode` set: when the whole-batch
    intermediate ``B * H * W * rank`` is at least :data:`CHUNK_MIN_BYTES`, the largest divisor
    ``k`` of ``B`` whose chunk's intermediate fits :data:`CHUNK_TARGET_BYTES` (at least 1), unless
    ``C_in + C_out`` exceeds :data:`CHUNK_MAX_GRAD_RATIO` times the chunk's ``k * H' * W'``
    output positions.
    Measured on the 2-core CPU (benchmarks/EXPERIMENTS.md, stop 29: ``python -m benchmarks.experiments
    resnet2d_scales``, ResNet-18's 3x3 convs at batch 8 to 32 on 112 and 224 images, before and
    after): the factorized path fwd+bwd of e.g. the (64->64) conv on 16 x 56 x 56 took 260.6 ms
    on the whole batch and 153.9 in chunks, the (128->128) conv on 8 x 28 x 28 86.9 and 45.7, the
    (256->256) conv on 32 x 7 x 7 61.2 and 42.4; in a scratch run (not kept), whole-batch
    intermediates of 3.6-4.7 MB (the benchmark's strided (128->256) conv on 8 x 14 x 14, the
    (512->512) one on 8 x 7 x 7) ran slower in chunks, hence the threshold. 3-D convs follow
    :func:`per_sample_default` and :func:`tile_plan` instead.
    """
    batch = x_shape[0]
    if _config["per_sample"] is not None or len(x_shape) != 4 or not is_static(x_shape) or batch < 2:
        return None
    if not loops_apply():
        return None
    per_sample_bytes = _sample_bytes(x_shape, rank, dtype)
    if batch * per_sample_bytes < CHUNK_MIN_BYTES:
        return None
    fits = [k for k in range(2, batch + 1) if batch % k == 0 and k * per_sample_bytes <= CHUNK_TARGET_BYTES]
    k = max(fits, default=1)
    if x_shape[-1] + y_shape[-1] > CHUNK_MAX_GRAD_RATIO * k * int(np.prod(y_shape[1:-1])):
        return None
    return k


def batch_plan(x_shape: Sequence[int], y_shape: Sequence[int], rank: int, dtype, per_sample: bool | None,
               local: bool = True) -> int | None:
    """Samples per step of the loop over the batch in which :func:`hocp_jax.conv.cp_conv` runs a
    factorized CP conv from ``x (B, *S, C_in)`` to ``y (B, *S', C_out)``, given its
    ``per_sample`` argument, or ``None`` (the whole batch at once). ``local``: whether its
    ``psi`` (if any) acts on each value alone; if not, the automatic rule is off. ``True``: one
    sample (the whole batch where the batch is symbolic, :func:`is_static`); ``None``:
    :func:`per_sample_default`, else :func:`batch_chunk_default`; ``False``: the whole batch."""
    if per_sample is None and local:
        return 1 if per_sample_default(x_shape, rank, dtype) else batch_chunk_default(x_shape, y_shape, rank, dtype)
    return 1 if per_sample and is_static(x_shape[:1]) else None


TILE_MIN_BYTES = 6 * 1024 * 1024
"""Smallest per-sample ``(1, *S, R)`` intermediate for which :func:`tile_plan` splits each sample
into tiles. Measured on the 2-core CPU (1 MiB L2 per core, 32 MiB shared L3; ``python -m
benchmarks.experiments tiles 5``, benchmarks/EXPERIMENTS.md): Jester conv2 (24 MB per sample) ran
fwd+bwd faster in tiles of every size tried (2 to 14 rows), conv1 (9 MB) in tiles of 3 to 14 rows
(0.83-0.95x; 2 rows: 1.16x), the transduced ResNet-18's first layer at B = 1 (27 MB) in every
size; Jester conv3 (5 MB) was no faster in any. 8 MiB until stop 34: in whole train steps
(``python -m benchmarks.experiments tile_threshold``) 6 MiB also tiles the first stage of the
transduced ResNet-18 on 112-pixel frames (6.9 MB per sample), and that step ran 0.86x as long;
on the other steps, and with lower thresholds, the times moved by less than two runs of one
program differ there."""
TILE_TARGET_PER_L2 = 1.5
"""Intermediate per tile that :func:`tile_plan` aims at, in sizes of a core's L2 cache
(:func:`tile_target_bytes`). Fits both hosts measured: on the AMD EPYC VM (1 MiB of L2 per core)
1.5 MiB, where Jester conv2's tiles of 3 rows (1.7 MB) ran faster than the 4 rows (2.3 MB) of a
2 MiB target in both runs that had them (stop 26: ``python -m benchmarks.experiments tiles`` and
``line_buffer``) and the 6 rows of 3 MiB took 1.06x their time (stop 62, ``cpu_loops``); on the
Intel Xeon VM (2 MiB of L2 per core; stop 69, ``python -m benchmarks.experiments tile_target 9``,
two runs) 3 MiB, where Jester conv1 (28 rows) took 0.94x and 0.96x the time of 1.5 MiB's 14 rows,
conv2 (6 rows) 0.93x twice, the Jester HO-CP train step 0.97x and 0.95x and the transduced
ResNet-18 step 0.99x and 0.98x (its stride-1 layers alone at one clip 0.88-1.18x)."""
TILE_TARGET_BYTES = 3 * 512 * 1024
"""Intermediate per tile where the L2 size cannot be read: :data:`TILE_TARGET_PER_L2` times 1 MiB."""


def tile_target_bytes() -> int:
    """Intermediate per tile that :func:`tile_plan` aims at (at most, up to rounding to whole rows):
    :data:`TILE_TARGET_PER_L2` times the L2 size (:func:`l2_cache_bytes`), else
    :data:`TILE_TARGET_BYTES`. Each host reads its own: processes on hosts with other L2 sizes
    trace other tiles, so a multi-host job over mixed hosts sets the rows
    (``configure(tile_rows=...)``)."""
    l2 = l2_cache_bytes()
    return int(TILE_TARGET_PER_L2 * l2) if l2 else TILE_TARGET_BYTES


def check_tile_rows(value, name: str) -> int | None:
    """``value`` (a :func:`tile_rows_mode` value) as ``None`` or an int (a NumPy one would not go into
    the JSON of a cache key); else a ``ValueError`` naming ``name``."""
    if value is not None and not (is_int(value) and value >= 0):
        raise ValueError(f"{name}={value!r}: expected None (automatic), 0 (off) or a positive number of rows")
    return None if value is None else int(value)


def tile_rows_mode(value: int | None) -> contextlib.AbstractContextManager:
    """Within the block, :func:`tile_plan` uses tiles of ``value`` rows wherever a conv can be
    tiled (``0``: never tile; ``None``: the automatic rule). Read at trace time, like
    :func:`per_sample_mode`."""
    return scoped(_config, "tile_rows", check_tile_rows(value, "value"))


def tile_plan(x_shape: Sequence[int], rank: int, dtype, out_sizes: Sequence[int], halos: Sequence[int],
              strides: Sequence[int], pads: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """How the factorized CP path splits each sample into tiles, or ``None`` (whole samples).

    Returns ``(i, rows)``: tile spatial mode ``i`` (0-based; of the modes with stride 1 and no
    negative padding, the one with the most output positions) into pieces of ``rows`` output rows,
    each computed from its input rows plus a halo of ``halos[i]`` rows (``dilation * (K - 1)``),
    so the per-tile intermediates stay in cache.
    None in a :func:`forward_mode` block. Automatic rule (:func:`tile_rows_mode` sets the rows
    instead): on the CPU backend with one
    program per device (:func:`program_per_device`), three or more modes (whatever the batch
    size, since a tile is part of one sample) and no strided mode (the strided passes run first,
    on the halo rows too: the strided transduced ResNet-18 layer took 1.7-2.1x as long in tiles of
    2-6 frames), when the ``(1, *S, R)``
    per-sample intermediate is at least :data:`TILE_MIN_BYTES`, in tiles of about
    :func:`tile_target_bytes`.
    """
    candidates = [i for i, (st, p) in enumerate(zip(strides, pads)) if st == 1 and min(p) >= 0]
    if not candidates or _config["tile_rows"] == 0 or _config["forward_mode"] or not is_static(x_shape):
        return None
    i = max(candidates, key=lambda j: out_sizes[j])
    rows = _config["tile_rows"]
    if rows is None:
        per_sample_bytes = _sample_bytes(x_shape, rank, dtype)
        if (per_sample_bytes < TILE_MIN_BYTES or len(x_shape) < 5 or max(strides) > 1
                or not loops_apply()):
            return None
        n_tiles = -(-per_sample_bytes // tile_target_bytes())
        rows = -(-out_sizes[i] // n_tiles)
    rows = max(rows, halos[i], 1)  # a tile no shorter than its halo
    return (i, rows) if rows < out_sizes[i] else None


OUT_FACTOR_BEFORE_LOOPS_MAX_RANK = 32
"""Ranks below it take the output factor transposed before the loops (:func:`out_factor_before_loops`)."""


def out_factor_before_loops(rank: int) -> bool:
    """Whether the factorized CP path transposes its output factor ``diag(lambda) U^(T)`` to
    ``(R, C_out)`` before its sample or tile loops (an operand of the loop), rather than inside
    the loop body, where XLA folds the transpose into the output contraction as a transposed
    operand: below :data:`OUT_FACTOR_BEFORE_LOOPS_MAX_RANK`. The same values either way.

    Stop 63, on the 2-core AMD EPYC host, ``python -m benchmarks.experiments out_factor_layout``
    (benchmarks/EXPERIMENTS.md), the factorized path fwd+bwd of the Jester layers with the
    transpose before the loops over inside them: conv1 (rank 18, in tiles) 0.94x, conv2 (384, in
    tiles) 1.01x, conv3 (768, one sample at a time) 1.03x, conv4 (1536) 1.07x. Stop 64, the same
    experiment with 14 more layers (``out_factor_layout 9``): ranks 4-18 (first layers of 1-3
    channels) 0.86x-0.97x, the Jester conv1 0.85x; rank 32 1.01x, 48 1.04x, 96 1.05x, 192 1.10x,
    288 0.99x; the Jester conv2 to conv4 1.00x, 1.00x, 1.03x."""
    return rank < OUT_FACTOR_BEFORE_LOOPS_MAX_RANK


TILE_FOLD_MAX_COLUMNS = 27
"""Most input channels times folded taps of the input contraction of :func:`tile_fold_modes`."""
TILE_FOLD_COLUMNS_PER_RANK = 1.5
"""Most folded columns (input channels times folded taps) per rank component for :func:`tile_fold_modes`."""


def tile_fold_mode(value: bool | None) -> contextlib.AbstractContextManager:
    """Within the block, :func:`tile_fold_modes` folds wherever its shape conditions allow
    (``True``), never (``False``), or by its automatic rule (``None``). Read at trace time, like
    :func:`per_sample_mode`."""
    return scoped(_config, "tile_fold", automatic_flag(value, "value"))


def tile_fold_modes(in_channels: int, kernel_size: Sequence[int], strides: Sequence[int], out_sizes: Sequence[int],
                    tiled: int, rank: int) -> tuple[int, ...]:
    """Which modes' depthwise passes the factorized CP path, running in tiles along mode ``tiled``
    (:func:`tile_plan`) with no psi between the factors, folds into its input contraction: that
    contraction then reads the tile's input as the shifted copies of those modes' taps, one
    ``(N, C_in K_a K_b) x (C_in K_a K_b, R)`` product with the partly rebuilt kernel, and the
    folded passes are not run (:func:`hocp_jax.conv.cp_conv`). Returns the sorted mode indices:
    ``tiled`` and the stride-1 mode with the most output positions among the others, when at
    least one mode is left unfolded and the folded columns ``C_in K_a K_b`` are at most
    :data:`TILE_FOLD_MAX_COLUMNS` (an RGB input under a 3x3 kernel) and at most
    :data:`TILE_FOLD_COLUMNS_PER_RANK` times the ``rank``; else ``()``. :func:`tile_fold_mode`
    turns it on or off.

    A pass over the ``(*S, R)`` intermediate costs more than the longer product when the input
    has so few channels, and the more so the larger the rank; at small ranks the passes are
    cheap and writing the tile's shifted copies costs more. Stop 64, on the 2-core AMD EPYC host,
    factorized fwd+bwd of first layers (no input gradient, 3x3x3, tiles along h, h and w folded),
    ``python -m benchmarks.experiments tile_fold 9`` (benchmarks/EXPERIMENTS.md), time folded /
    unfolded: Jester conv1 (3 -> 64 channels, rank 18, 8 x 18x84x84) 0.95x (0.91x and 0.95x in
    stop 63); 3 channels on 4 x 16x112x112 at ranks 8, 12, 18, 32 1.11x, 1.13x, 0.99x, 0.77x, at
    rank 48 on 2 clips 0.85x, 3 -> 32 channels at rank 18 1.02x; 2 channels at ranks 8 and 16
    1.01x and 0.89x; 1 channel at ranks 4, 6 and 16 0.93x, 0.85x, 0.54x. The rule picks the faster on
    10 of the 12 (not the 1.02x tie, nor the 0.93x at rank 4). Stop 49 had measured the fold one
    sample at a time, without tiles, and slower (``fold_taps``): 1.08x on conv1 folding two modes;
    on the layers of 64 channels and more 1.39-4.92x, so the rule stays at few input channels,
    and in tiles."""
    n = len(kernel_size)
    others = [i for i in range(n) if i != tiled and strides[i] == 1]
    if not others or n < 3 or _config["tile_fold"] is False:
        return ()
    second = max(others, key=lambda i: out_sizes[i])
    folded = tuple(sorted((tiled, second)))
    columns = in_channels * kernel_size[tiled] * kernel_size[second]
    if _config["tile_fold"] is None and (columns > TILE_FOLD_MAX_COLUMNS or columns > TILE_FOLD_COLUMNS_PER_RANK * rank):
        return ()
    return folded
