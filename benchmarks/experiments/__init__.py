"""Side-by-side experiments behind the choices in hocp_jax (benchmarks/EXPERIMENTS.md, "Ideas
measured"; a summary in README.md, "Benchmarks").

Run one with ``python -m benchmarks.experiments <name> [rounds]`` (:mod:`.__main__`); the code is in
:mod:`.layers` (one conv layer at a time), :mod:`.steps` (whole train steps), :mod:`.workers`
(one process per setting), :mod:`.variants` (the code variants measured and not kept) and
:mod:`.common` (shared helpers).

``python -m benchmarks.experiments stem``: HO-CP ResNet-18 2-D train step (8 x 112 x 112) with the
stem told it gets no input gradient (``auto`` -> reconstructed stem, the default now) vs the stem
treated like an inner layer (``auto`` -> factorized stem, the previous behaviour), and the dense
ResNet-18, interleaved in one process. Prints medians and ratios as JSON.

``python -m benchmarks.experiments xla_flags [rounds]``: the Jester stack (the four 3x3x3 layers,
fwd+bwd, ``bench`` protocol) with the dense conv and the HO-CP ``auto`` path, under several
``XLA_FLAGS`` settings of the CPU backend. Flags are per process, so every setting runs in its
own worker process; the parent times the workers' calls in interleaved, rotated rounds (one call
runs at a time), so load from elsewhere hits all settings alike. Prints medians and ratios to the
default-flags dense stack as JSON, and (since stop 62) with the cross-core round trip taken before
each call, each call's and each setting's stack medians over the calls with the CPUs close and far
apart (``benchmarks.placement``).

``python -m benchmarks.experiments malloc [rounds]``: the same worker scheme under the glibc
allocator settings of :data:`benchmarks.experiments.workers.MALLOC_SETTINGS` (XLA's CPU
runtime and PyTorch both allocate with glibc's malloc): the Jester stack (JAX dense, ``auto`` and, with the ``bench`` extra, the
PyTorch/TensorLy-Torch peers), then the three train-step pairs. Shows how much of each ratio is
the allocator's doing rather than the conv's.

``python -m benchmarks.experiments malloc_no_mmap [rounds]``: ``malloc`` with glibc's defaults,
"one arena, no mmap" and "no mmap" (stop 54: ``mmap`` off, the per-thread arenas kept) only.

``python -m benchmarks.experiments step_memory [batch_scale]``: ``bench``'s train steps compiled
only (the number is a batch multiple, not rounds): each step's temporary memory from XLA's
``memory_analysis()`` as this backend builds it, with the CP convs' loops off (the GPU/TPU
program) and with the factorized convs one sample at a time (``conv_plans.per_sample_mode(True)``,
a memory option on any backend), and each HO-CP step's over its dense reference's.

``python -m benchmarks.experiments microbatches [rounds]``: the train steps of ``configs/affectnet.py``
(also with the dense ResNet-18), ``configs/jester.py:hocp_s`` and ``configs/jester.py:dense`` at
their batch sizes, the batch through the model whole and in
2, 4 and 8 micro-batches (``make_train_step(microbatches=k)``): each compiled step's temporary
memory (``memory_analysis()``, as built here and with the CP convs' loops off, the GPU/TPU
program) and ms per step, interleaved.

``python -m benchmarks.experiments small_maps [rounds]``: ungrouped stride-1 convs on 2-D maps
and clips about their kernel's size or smaller, fwd+bwd, as XLA's convolution and as
``conv_ops._taps_conv`` (one matrix product per tap that reads the input), interleaved per conv: the
figures of ``hocp_jax.conv_plans.small_map_taps``.

``python -m benchmarks.experiments small_maps_computed [rounds] [revision]``: four convs on maps
smaller than their kernel, the kernel a parameter or rebuilt from CP factors, fwd+bwd, with XLA's
convolution, the library's ``conv_ops._taps_conv`` and ``_taps_conv`` as it was at git ``revision``
(default e599394: each tap's kernel indexed), interleaved per conv.

``python -m benchmarks.experiments page_faults [rounds]``: minor page faults and ms of one call of
a jitted elementwise op whose output is a fresh 16 to 400 MB buffer, in one process per installed
allocator setting: which buffer sizes each setting maps afresh on every call (glibc's per-thread
arenas grow in 64 MiB heaps and map anything larger with ``mmap`` whatever ``MALLOC_MMAP_MAX_``
says).

``python -m benchmarks.experiments host_devices [rounds]``: the same worker scheme with the Jester
stack (JAX dense and ``auto``, ``bench`` protocol) in a worker on one host device and in one on two
(``--xla_force_host_platform_device_count=2``, the batch split over them under ``jax.shard_map``,
``auto`` also with each device's share one sample at a time), the cross-core round trip taken before
each call: whether a device per vCPU, each with its own samples, makes the factorized path
insensitive to where the host puts the two vCPUs (``by_placement``, ``stack_by_placement``), and at
what cost.

``python -m benchmarks.experiments jit_devices [rounds]``: the same worker scheme with ``bench``'s
Jester train steps (dense and HO-CP, two clips) under ``jit`` as ``train.py`` runs them, in a worker
on one host device and in one on two (the batch split over them, an auto-axis mesh); the HO-CP step
on two devices traced with the mesh in context (its CP convs then run each device's share with
their loops, :func:`hocp_jax.conv_plans.batch_split`) and without (each share whole), the
cross-core round trip before each call (``by_placement``).

``python -m benchmarks.experiments main_job_malloc [rounds]``: ``train.py``'s default job (the
README's first command) end to end under glibc's defaults and each other installed allocator
setting but ``hugetlb``, in turn: wall-clock seconds and each stage's median train steps per
second. Whether the allocator tip for CPU training holds for a whole job, small models included.

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
JAX's ``auto`` (factorized, per sample, in tiles) and dense conv and, with the ``bench`` extra,
PyTorch's dense conv (in its own process) alternating, each call's time and what the process did
during it: the hypervisor's steal time (``/proc/stat``), user and system CPU time, minor page
faults and context switches (``getrusage``), and right before it the round trip of a cache line
between the first two CPUs (:class:`benchmarks.placement.CrossCoreProbe`): whether slow calls come
in phases, whether they hit every program, what grows in a slow call, and whether slow calls are
those made with the two CPUs far apart (``by_placement``: each program's median over the calls
with the CPUs close and far apart).

``python -m benchmarks.experiments tiles [rounds]``: the Jester stack layers (factorized, fwd+bwd,
``bench`` protocol, one sample at a time) with each sample whole, cut into tiles by the automatic
rule (:func:`hocp_jax.conv_plans.tile_plan`), and in tiles of 2, 3, 6 and 14 output rows wherever a
layer can be tiled (:func:`hocp_jax.conv_plans.tile_rows_mode`), interleaved; also the transduced
ResNet-18 3x3x3 layers with one clip (B = 1, as in the train step; "whole samples" is then the
whole-batch program), and the Jester HO-CP net's train step (ReLU between the factors, so tiled
through ``psi_pointwise``) with tiles off and automatic, beside the dense net's.

``python -m benchmarks.experiments cpu_loops [rounds]``: whether the CPU loop rules of the factorized
path (:func:`hocp_jax.conv_plans.per_sample_default`, :func:`hocp_jax.conv_plans.tile_plan`), whose
constants were measured on a 2-vCPU host, hold on the CPU it runs on: Jester conv1 to conv3
(factorized, fwd+bwd, ``bench`` protocol) with the whole batch at once, one sample at a time
untiled, the automatic rules, and tiles of two and four times the automatic rows, interleaved;
records the machine (``benchmarks.bench.machine_info``: CPU model, the CPUs this process may run
on, backend). Meant for a host with more cores than the development
VM (``benchmarks/device_check.sh``'s optional CPU stage).

``python -m benchmarks.experiments tile_target [rounds]``: the tiled layers (Jester conv1 and conv2
at batch 8, the transduced ResNet-18's stride-1 3x3x3 layers at one clip; factorized, fwd+bwd,
``bench`` protocol) with tiles of 1.5, 2, 3, 4.5 and 6 MiB of intermediate
(:func:`hocp_jax.conv_plans.tile_target_bytes`; the rows each gives: ``tile_rows``), and the Jester
HO-CP and transduced ResNet-18 train steps at 1.5, 3 and 4.5 MiB, all interleaved; ratios to
1.5 MiB (the target on a host with 1 MiB of L2 per core). Records the machine.

``python -m benchmarks.experiments dense_chunks [rounds]``: dense convs (fwd+bwd, random
cotangent, the input gradient but for 3-channel first layers) of ResNet-18 2-D shapes at batch 8
to 64, two 7x7 stems and Jester conv2's 3-D shape, through
:func:`hocp_jax.conv_ops.conv_general_dilated` with the whole batch at once (XLA's conv,
``conv_plans.dense_chunks_mode(False)``) and in chunks of samples (``True``), interleaved; records
each conv's chunk and whether the automatic rule (:func:`hocp_jax.conv_plans.dense_chunk`) takes it
on this host (since stop 75 only a CPU with AMX: :data:`hocp_jax.conv_plans.DENSE_CHUNK_CPU_FLAGS`).

``python -m benchmarks.experiments channel_pairs [rounds]``: the 1x1 products of few channels
(:func:`hocp_jax.conv_ops.channel_matmul`) as one ``(N, C) x (C, R)`` product and with rows paired
(:func:`hocp_jax.conv_plans.paired_rows`, forced on and off with ``paired_rows_mode``): a grid of
``C`` = 1, 2, 3, 4, 6 input channels by ``R`` = 8 to 128 output channels, each cell a loop over
the 48 tiles of Jester conv1's shape (16 x 84 positions of 18 frames) running the product and its
weight gradient, as a first layer's tile loops do; then Jester conv1's factorized path
(fwd+bwd, ``bench`` protocol) and the Jester HO-CP net's train step with the automatic rule and
with one product, interleaved.

``python -m benchmarks.experiments tile_fold [rounds]``: the first layers whose tiles can fold two
modes' passes into the input contraction (at most ``TILE_FOLD_MAX_COLUMNS`` columns,
:func:`hocp_jax.conv_plans.tile_fold_modes`): Jester conv1 (3 input channels, rank 18) and since
stop 64 eleven other first layers of video networks (1-3 input channels, ranks 4-48,
:func:`layers.fold_shapes`), factorized fwd+bwd (``bench`` protocol), with the fold off and on
(``tile_fold_mode(False)``, ``tile_fold_mode(True)``; before stop 64: off and by the automatic
rule), interleaved, with what the automatic rule picks.

``python -m benchmarks.experiments out_factor_layout [rounds]``: the Jester layers' factorized
path, and since stop 64 that of :func:`layers.fold_shapes`' first layers (ranks 4-48) and of three
layers of ranks 96-288 (:func:`layers.mid_rank_shapes`) (fwd+bwd, ``bench`` protocol), with its
output factor transposed to ``(R, C_out)`` inside its sample and tile loops (where XLA folds the transpose into the product) and before them
(:func:`hocp_jax.conv_plans.out_factor_before_loops`, forced both ways), interleaved, with the
automatic rule's choice per layer.

``python -m benchmarks.experiments tile_threshold [rounds]``: the HO-CP video train steps (``bench``'s
transduced ResNet-18 on one 8 x 112 x 112 clip and Jester HO-CP net, beside their dense
references, and the transduced ResNet-18 on one 8 x 224 x 224 clip) with the tile rule's byte
threshold (:data:`hocp_jax.conv_plans.TILE_MIN_BYTES`) at 8, 6, 4 and 3 MiB, interleaved, with the
convs each threshold runs in tiles: whether the threshold calibrated on single layers holds
inside a whole step.

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

``python -m benchmarks.experiments resnet2d_scales [rounds]``: the ResNet-18 2-D train-step pair of
``bench`` (8 images of 112 x 112) and the same pair on 32 images of 112 x 112, 8 of 224 x 224 and
16 of 224 x 224, each pair interleaved, with ``auto``'s path for every CP conv of the HO-CP step;
then, per scale, the step's seven 3x3 conv shapes one by one with the dense conv and both CP
paths (fwd+bwd, ``bench`` protocol) and their sums over the network: whether the 2-D step's
parity at the benchmark's size holds at the sizes a user trains at.

``python -m benchmarks.experiments resnet2d_step_picks [rounds]``: the HO-CP ResNet-18 2-D train
step of ``bench`` with ``auto``'s path for every CP conv, and once per CP conv shape of the step
(the stem too) with the convs of that shape on the other path, interleaved with the dense step:
whether each of ``auto``'s picks is the faster one inside the step, where the convs' operands
are not in cache as they are when a layer is timed alone.

``python -m benchmarks.experiments transduced_step_picks [rounds]``: the same for ``bench``'s
transduced HO-CP ResNet-18 train step (one clip of 8 frames of 112 x 112; the 3-D stem, which gets
no input gradient, too), interleaved with the dense 3-D step.

``python -m benchmarks.experiments chunk_picks [rounds]``: the ResNet-18 2-D 3x3 conv shapes on
batches of 2 to 64 images of 112 to 224 pixels whose ``auto`` pick the cost model's
``CHUNKED_BYTES_SCALE`` changes (the factorized path in chunks of samples counted as cheaper per
byte), each with the dense conv and both CP paths (fwd+bwd, ``bench`` protocol), interleaved:
whether the changed picks are the faster paths.

``python -m benchmarks.experiments chunk_rule [rounds]``: the ResNet-18 2-D 3x3 conv shapes on 8
or 16 images of 224 pixels and 32 or 64 of 112 that the chunk rule's byte thresholds would run in
chunks of samples: the factorized path in those chunks against the whole batch, and the dense
conv, interleaved, with each shape's channels per chunk output position (what
``CHUNK_MAX_GRAD_RATIO`` bounds).

``python -m benchmarks.experiments dense_baseline [rounds]``: the Jester stack layers and the
seven 3x3 conv shapes of the ResNet-18 2-D train step (fwd+bwd, ``bench`` protocol) with the JAX
dense conv as ``lax``'s convolution (the benchmark's reference) and as a patches matrix product
(im2col), beside the HO-CP ``auto`` path, interleaved per layer: whether the ratios to JAX dense
hold against the faster dense program of each layer.

``python -m benchmarks.experiments dense_baseline_steps [rounds]``: the three train-step pairs of
``bench`` (HO-CP model and dense reference), each step compiled as usual and with every dense conv
(the dense models', and the HO-CP models' reconstructed convs and dense shortcuts) run as a
patches matrix product, the four steps of a pair interleaved: the HO-CP/dense ratios with
``lax``'s convs and with the patches program on both sides.

``python -m benchmarks.experiments compiler_options [rounds]``: the ResNet-18 2-D train-step pair
of ``bench``, each step compiled under several XLA CPU compiler options (scheduler type,
optimisation preset, oneDNN, XNNPACK graph fusion, fast math, XNNPACK off; passed per program
with ``jax.jit(..., compiler_options=...)``, so all run in one process) and once more with the
default options as a noise reference, all interleaved: the HO-CP/dense ratio per setting.

``python -m benchmarks.experiments per_sample [rounds]``: the HO-CP ResNet-18 train steps (2-D
static, and transduced to 3-D) with ``per_sample`` off, automatic (the default rule) and on for
every factorized conv (:func:`hocp_jax.conv_plans.per_sample_mode`), each interleaved with its
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
matmuls (:func:`hocp_jax.conv_ops.channel_matmul`, was a multi-axis einsum), the max-pool of
:mod:`hocp_jax.pooling` (was ``lax.reduce_window``, in the dense references too) and the
per-sample loop for layers with a sample-wise psi (was whole batch). Patched at trace time,
interleaved; ratios use the dense step with the same pool.

``python -m benchmarks.experiments rank_multiple [rounds]``: every ``bench`` conv layer's factorized
path (fwd+bwd, ``bench`` protocol) at its rank ``r`` and at the ranks ``8k``, ``8k + 1`` and
``8(k + 1)`` around it, interleaved per layer: whether a rank component's cost steps at
multiples of 8, the float32 lanes of an AVX2 vector.

``python -m benchmarks.experiments autotune_steps [rounds]``: the three HO-CP train steps of
``bench`` compiled with the analytic picks and with the measured autotune's (every conv shape
timed while the step is traced, no cache file), each pair interleaved with its dense step: the
picks that differ, the measured kernel-gradient picks beside the host's rule, the tracing and
compile time with the timing, and the step times.

``python -m benchmarks.experiments path_ties [rounds]``: each ResNet-18 2-D layer of ``bench``, its
two CP paths timed three times under three protocols in one process (the measured autotune's own
rounds, the two paths interleaved alone, and with the dense conv): whether a layer's faster path
is a tie within the spread of a reading.

``python -m benchmarks.experiments chunk_scale [rounds]``: both CP paths on the ResNet-18 2-D conv
shapes of ``chunk_picks``'s grid whose pick the cost model's scale for chunked convs
(``hocp_jax.counting.CHUNKED_BYTES_SCALE``) decides, and on its strided shapes at batch 16-64,
interleaved per shape: how many shapes each candidate scale picks right, and its worst pick.

``python -m benchmarks.experiments kernel_grad [rounds]``: every conv layer of ``bench`` with the
reconstructed CP path's kernel gradient as one matrix product per tap
(``hocp_jax.conv_ops.conv_matmul_kernel_grad``) and as XLA's kernel-gradient convolution, and the
dense conv, interleaved per layer (the data behind ``hocp_jax.conv_plans.matmul_kernel_grad``).

``python -m benchmarks.experiments kernel_grad_batches [rounds]``: the same two kernel gradients of
the reconstructed CP path on ResNet-18's seven 2-D 3x3 conv shapes at batch 16-96 of 224-pixel
and 64-128 of 112-pixel images, with the size of each conv's input (the data behind
``hocp_jax.conv_plans.KERNEL_GRAD_MATMUL_MIN_BYTES``) and what the host's rule loses.

``python -m benchmarks.experiments tucker_tt_kernel_grad [rounds]``: the same two kernel gradients
in both paths of the Tucker and TT convs, on ResNet-18's seven 2-D 3x3 conv shapes at batch 8
and 32, with the dense conv, interleaved per layer.

``python -m benchmarks.experiments low_precision [rounds]``: every conv layer of ``bench`` in
float32 and in bfloat16 computation from float32 weights: the dense conv, the reconstructed path,
and the factorized path as the library runs it on CPU (float32 intermediates,
``hocp_jax.conv_plans.compute_dtype``) and in bfloat16 arithmetic, interleaved per layer, with the
analytic pick in each dtype.

``python -m benchmarks.experiments low_precision_steps [rounds]``: the three train-step pairs of
``bench`` in float32 and with ``dtype=bfloat16`` (float32 parameters), the HO-CP steps also in
bfloat16 arithmetic, interleaved per pair.

``python -m benchmarks.experiments depthwise [rounds]``: the 3x3 depthwise convs of the CIFAR-10
MobileNet-v2 (batch 32, fwd+bwd) as XLA's grouped conv and as the shift kernel
(``hocp_jax.conv_ops.depthwise_conv``), in float32, bfloat16, and bfloat16 computed in float32,
interleaved per layer; then the separable conv with either depthwise step beside the CP conv.

``python -m benchmarks.experiments pointwise [rounds]``: every distinct 1x1 conv of the CIFAR-10
MobileNet-v2 (batch 32 and 128) and of ``bench``'s dense ResNet-18 2-D and 3-D steps, found by
tracing the models, fwd+bwd as XLA's convolution and as ``hocp_jax.conv_ops.conv_general_dilated``
runs it on CPU (one matrix product), interleaved per conv.

``python -m benchmarks.experiments conv_routes [rounds]``: train steps with the models' 1x1 and
depthwise convs as ``hocp_jax.conv_ops.conv_general_dilated`` runs them (matrix products, the shift
kernel) and as XLA's convolution: CIFAR-10 MobileNet-v2 dense and HO-CP at batch 32 and 128, and
``bench``'s ResNet-18 steps (their 1x1 convs are the shortcuts), interleaved per group;
``conv_routes_resnet18 [rounds]`` runs the ResNet-18 group alone (15 rounds by default).

``python -m benchmarks.experiments patches_memory [rounds]``: ``bench``'s dense 3-D train steps
(ResNet-18 3-D, the Jester net) with ``lax``'s convs, with their dense convs as a patches matrix
product, and with that product under ``jax.checkpoint``, interleaved: ms per step and XLA's
temporary buffers per compiled step.

``python -m benchmarks.experiments stem_3d [rounds]``: the 3-D stem of the HO-CP ResNet-18 on
clips (3->64, 3x7x7, stride (1, 2, 2), rank 116, no input gradient) with both CP paths at five
clip sizes, fwd+bwd, interleaved: measured and modelled factorized/reconstructed ratios and the
analytic pick.

``python -m benchmarks.experiments fold_taps [rounds]``: the Jester layers factorized as the
library runs them and with the depthwise passes of the leading modes folded into the input
contraction (one matrix product of the input's shifted copies with the partly rebuilt kernel,
:func:`.variants.cp_conv_folded`), fwd+bwd, interleaved per layer.

``python -m benchmarks.experiments pool_blocks [rounds]``: the Jester net's 2x2x2 max-pools pooled
as blocks (the library's path for windows that tile the input in stop 49, dropped in stop 50) and
by the library's shift path, each pool alone and in ``bench``'s Jester dense and HO-CP train
steps, interleaved, with each step's gradient error against ``lax.reduce_window``'s pool.

``python -m benchmarks.experiments patches_split [rounds]``: video networks' first convs (3-D,
at most 4 input channels: the patches route on CPU) with the patches product split by the first
mode's taps and as one product, fwd + kernel gradient, interleaved per shape, with the rule's
pick; then ``bench``'s dense 3-D and transduced HO-CP ResNet-18 steps compiled both ways.

``python -m benchmarks.experiments pool_index [rounds]``: the library's max-pool (the forward
pass keeps each window's first maximum's index) against its stop 50-64 version (the backward
pass found that index again from the saved input and output), each pool of the Jester nets' first
two blocks and of the ResNet-18 2-D stem alone and all six of ``bench``'s train steps, interleaved,
with each step's gradient error against ``lax.reduce_window``'s pool. (Since stop 66 the models'
pools take the batch norm's input: pool_blocks and pool_index now time the pools there.)

``python -m benchmarks.experiments norm_pool [rounds]``: the models' batch norm -> activation ->
max-pool blocks in pooled space (the library's, stop 66) against Flax's BatchNorm and the
activation on full-size maps before the pool (stops 50-65), each block of ``bench``'s Jester
steps and the ResNet-18 2-D stem's alone and ``bench``'s Jester train steps, interleaved, with
each step's gradient error against the full-size blocks with ``lax.reduce_window``'s pool.

``python -m benchmarks.experiments custom_jvp_programs [rounds]``: the max-pool, the depthwise
shift kernel and the loop over chunks of samples, custom JVPs since stop 71 (so that ``jax.jvp``
works), against the custom VJPs they replaced (:mod:`benchmarks.experiments.variants`, all three
patched in at once): fwd+bwd of the pools of ``bench``'s steps, four depthwise passes, the
factorized path one sample at a time and in chunks, a dense conv in chunks, then ``bench``'s six
train steps, compared by :func:`benchmarks.xla_profile.program_fingerprint` (in order, and with
each computation's instructions in any order), with the largest difference of their results and
XLA's temporary memory; with ``rounds``, every pair timed, interleaved.

``python -m benchmarks.experiments export_sizes [rounds]``: inference of the full-size HO-CP
ResNet-18 on 8 x 64 x 64 x 3 images, exported at the static shape, with a symbolic batch and with
symbolic batch, height and width (stop 73), timed interleaved, with each export's largest
difference from ``model.apply``.

``python -m benchmarks.experiments input_patches [rounds]``: ``bench``'s six train steps as the
library runs them and with the networks' first convs (3 input channels) as a patches matrix
product, the HO-CP models' stems on their reconstructed path, interleaved.
"""
