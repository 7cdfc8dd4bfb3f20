#!/usr/bin/env bash
# The checks to run on a lent NVIDIA GPU machine, in one call, from the repository root:
#   bash benchmarks/device_check.sh OUTDIR [LAYER_S TEST_S MODEL_S [BATCH_SCALE [CPU_S]]]
# That machine has its own jax (CUDA), flax, optax, torch; nothing can be installed from a registry
# there, so TensorLy-Torch and TensorLy travel as wheels in .whl/ (git-ignored), fetched beforehand:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl tensorly==0.10.0 tensorly-torch==0.5.0
# Stages,
# each under its own time limit, everything logged to OUTDIR/log.txt:
#   1. a smoke check: versions, devices, a CP conv against the dense conv of its kernel;
#   2. benchmarks.bench's layers with the peers on the GPU (results_gpu_layers.json), `auto` under
#      the analytic policy so that both its GPU rule and the measured policy (the GPU's default
#      since stop 47, which bench scores beside it) are scored;
#   3. the conv, dtype and layer tests on the GPU, float32 at full precision, analytic picks (no
#      timing inside the tests) (tests.txt);
#   4. benchmarks.bench's train steps (results_gpu_models.json), under the default (measured) policy
#      and, in the same rounds, each HO-CP step under the analytic one (--policy-steps), without the
#      patches programs, one of which XLA's GPU compiler aborted on (jax 0.11.2;
#      benchmarks/EXPERIMENTS.md, stop 46).
#   5. the train steps' temporary memory on the GPU's compiler, compiled only (step_memory.json:
#      python -m benchmarks.experiments step_memory, as built, loops off, one sample at a time).
#   6. optional (CPU_S > 0 seconds; default 0, skipped): the CPU loop rules of the factorized path,
#      calibrated on the 2-vCPU development VM, on this machine's many CPU cores (cpu_loops.json:
#      JAX_PLATFORMS=cpu python -m benchmarks.experiments cpu_loops 3). The other stages' defaults
#      (220 + 90 + 140 + 60 s, plus the machine's start) fill most of a 15-minute device budget:
#      give this stage its seconds by trimming theirs.
# BATCH_SCALE multiplies the batch sizes of stages 2 and 4 (bench --batch-scale; 1: the CPU run's).
# bench keeps the rows it timed when a stage runs out of time. The markdown of each results file
# is made afterwards: python -m benchmarks.bench --rescore --out FILE --md FILE.md.
set -u
out=${1:?usage: bash benchmarks/device_check.sh OUTDIR [LAYER_S TEST_S MODEL_S [BATCH_SCALE [CPU_S]]]}
layer_s=${2:-220} test_s=${3:-90} model_s=${4:-140} scale=${5:-1} cpu_s=${6:-0} memory_s=60
mkdir -p "$out"
log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$out/log.txt"; }
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45  # the rest of the card is the peers'
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || { log "wheels did not install"; exit 1; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

log "stage 1: smoke"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$out/log.txt"
python3 - <<'EOF' 2>&1 | tee -a "$out/log.txt"
import jax, jax.numpy as jnp, numpy as np, flax, optax
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())
from hocp_jax import conv, conv_ops, init
key = jax.random.key(0)
x = jax.random.normal(key, (2, 6, 10, 10, 8))
p = init.init_cp_params(key, 8, 16, (3, 3, 3), 12)
with jax.default_matmul_precision("highest"):
    want = conv_ops.dense_conv(x, conv.cp_to_kernel(p, ("d", "h", "w")), padding=1)
    for impl in ("factorized", "reconstructed", "auto"):
        got = conv.cp_conv(x, p, padding=1, implementation=impl)
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        print(impl, "relative max error", err)
        assert err < 1e-5, impl
try:
    import torch, tltorch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "tltorch", tltorch.__version__)
except ImportError as e:
    print("peers missing:", e)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "smoke check failed"; exit 1; }

log "stage 2: layers (limit ${layer_s} s)"
timeout "$layer_s" python3 -m benchmarks.bench --only jester resnet2d resnet3d --autotune analytic --batch-scale "$scale" \
  --out "$out/results_gpu_layers.json" --md /dev/null 2>&1 | grep -v "^|" | tee -a "$out/log.txt"
log "stage 2 exit ${PIPESTATUS[0]}"

log "stage 3: tests (limit ${test_s} s)"
JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest HOCP_JAX_AUTOTUNE=analytic \
  timeout "$test_s" \
  python3 -m pytest -q -p no:cacheprovider -n 6 tests/test_conv.py tests/test_dtype.py tests/test_layers.py \
  >"$out/tests.txt" 2>&1
log "stage 3 exit $?"; tail -n 25 "$out/tests.txt" | tee -a "$out/log.txt"

log "stage 4: train steps (limit ${model_s} s)"
timeout "$model_s" python3 -m benchmarks.bench --only models --no-peers --no-patches-steps --policy-steps --batch-scale "$scale" \
  --out "$out/results_gpu_models.json" --md /dev/null 2>&1 | grep -v "^|" | tee -a "$out/log.txt"
log "stage 4 exit ${PIPESTATUS[0]}"

log "stage 5: train-step memory (limit ${memory_s} s)"
timeout "$memory_s" python3 -m benchmarks.experiments step_memory "$scale" >"$out/step_memory.json" 2>>"$out/log.txt"
log "stage 5 exit $?"; tail -n 3 "$out/step_memory.json" | tee -a "$out/log.txt"

if [ "$cpu_s" -gt 0 ]; then
  log "stage 6: CPU loop rules on $(nproc) CPUs (limit ${cpu_s} s)"
  lscpu 2>/dev/null | grep -E "^(Model name|CPU\(s\)|L2 cache|L3 cache)" | tee -a "$out/log.txt"
  JAX_PLATFORMS=cpu timeout "$cpu_s" python3 -m benchmarks.experiments cpu_loops 3 >"$out/cpu_loops.json" 2>>"$out/log.txt"
  log "stage 6 exit $?"; tail -n 5 "$out/cpu_loops.json" | tee -a "$out/log.txt"
fi
