"""``python -m benchmarks.experiments <name> [rounds] [revision]``: runs one experiment and prints
its result as JSON (the package docstring describes each); ``_worker <suite>`` is the worker
process of :mod:`benchmarks.experiments.workers`."""

from __future__ import annotations

import json
import sys

from benchmarks import experiments
from benchmarks.experiments import layers, steps, workers

EXPERIMENTS = {
    "stem": steps.stem, "step_profile": steps.step_profile, "per_sample": steps.per_sample,
    "step_changes": steps.step_changes, "compiler_options": steps.compiler_options,
    "resnet2d_scales": steps.resnet2d_scales, "resnet2d_step_picks": steps.resnet2d_step_picks,
    "transduced_step_picks": steps.transduced_step_picks,
    "dense_baseline_steps": steps.dense_baseline_steps, "tile_threshold": steps.tile_threshold, "autotune_steps": steps.autotune_steps,
    "low_precision_steps": steps.low_precision_steps, "pool_blocks": steps.pool_blocks, "pool_index": steps.pool_index, "norm_pool": steps.norm_pool, "custom_jvp_programs": steps.custom_jvp_programs, "export_sizes": steps.export_sizes, "input_patches": steps.input_patches, "conv_routes": steps.conv_routes,
    "conv_routes_resnet18": steps.conv_routes_resnet18, "patches_memory": steps.patches_memory, "step_memory": steps.step_memory,
    "shift_kernel": layers.shift_kernel, "line_buffer": layers.line_buffer, "remat": layers.remat,
    "layout": layers.layout, "tiles": layers.tiles, "cpu_loops": layers.cpu_loops, "tile_target": layers.tile_target, "dense_chunks": layers.dense_chunks, "channel_pairs": layers.channel_pairs, "tile_fold": layers.tile_fold, "patches_split": layers.patches_split, "out_factor_layout": layers.out_factor_layout, "coresidence": layers.coresidence, "phases": layers.phases,
    "matmul": layers.matmul, "resnet2d_step_layers": layers.resnet2d_step_layers, "chunk_picks": layers.chunk_picks,
    "chunk_scale": layers.chunk_scale, "kernel_grad": layers.kernel_grad, "kernel_grad_batches": layers.kernel_grad_batches,
    "tucker_tt_kernel_grad": layers.tucker_tt_kernel_grad,
    "chunk_rule": layers.chunk_rule, "dense_baseline": layers.dense_baseline, "rank_multiple": layers.rank_multiple,
    "path_ties": layers.path_ties, "low_precision": layers.low_precision, "depthwise": layers.depthwise,
    "pointwise": layers.pointwise, "stem_3d": layers.stem_3d, "fold_taps": layers.fold_taps,
    "small_maps": layers.small_maps, "small_maps_computed": layers.small_maps_computed,
    "xla_flags": workers.xla_flags, "malloc": workers.malloc, "processes": workers.processes,
    "main_job_malloc": workers.main_job_malloc, "host_devices": workers.host_devices,
    "jit_devices": workers.jit_devices, "malloc_no_mmap": workers.malloc_no_mmap,
    "page_faults": workers.page_faults, "microbatches": steps.microbatches,
}
WITH_REVISION = ("shift_kernel", "line_buffer", "small_maps_computed")


def main(argv: list[str]) -> None:
    if argv[:1] == ["_worker"] and len(argv) == 2:
        workers.worker(argv[1])
        return
    name = argv[0] if argv else None
    most = 3 if name in WITH_REVISION else 2
    rounds_ok = len(argv) < 2 or (argv[1].isdecimal() and int(argv[1]) >= 1)
    if name not in EXPERIMENTS or len(argv) > most or not rounds_ok:
        usage = (f"usage: python -m benchmarks.experiments <name> [rounds]{' [revision]' if name in WITH_REVISION else ''}; "
                 f"got {' '.join(argv) or 'no arguments'}; rounds: an integer >= 1; "
                 f"names: {', '.join(sorted(EXPERIMENTS))}")
        sys.exit(usage if argv else f"{experiments.__doc__}\n{usage}")
    rounds = [int(argv[1])] if len(argv) > 1 else []
    print(json.dumps(EXPERIMENTS[name](*rounds, *argv[2:]), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
