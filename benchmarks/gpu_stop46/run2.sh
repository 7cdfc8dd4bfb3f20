#!/usr/bin/env bash
# Stop 46's second run on the lent H200 (bash benchmarks/gpu_stop46/run2.sh OUTDIR, from the
# repository root, TensorLy wheels in .whl/): 4-D conv gradients GPU vs CPU; which train steps
# crash XLA's GPU compiler and whether --xla_gpu_enable_triton_gemm=false avoids it; the train
# steps; the layers at 16x the batch; the conv tests. It ran from scratch_gpu/ at commit 6256a84
# (its paths changed since); its output: run2_log.txt and run2_tests.txt here, the layers in
# benchmarks/results_gpu_h200_x16.json. Run 1 was `bash benchmarks/device_check.sh OUT 220 90 140`
# at 6256a84: run1_log.txt, run1_tests.txt, benchmarks/results_gpu_h200.json.
set -u
out=$1
mkdir -p "$out" /tmp/dump
log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$out/log.txt"; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
log "A: 4-D conv gradients"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 60 python3 benchmarks/gpu_stop46/conv4d.py 2>&1 | grep -v "^W\|^I" | tee -a "$out/log.txt"
log "B1: compiles, default flags and without triton gemm, in parallel"
names=("resnet18 dense 2-D" "resnet18_hocp static" "resnet18_3d dense" "resnet18_hocp transduced" "jester dense" "jester_hocp")
i=0
for n in "${names[@]}"; do
  i=$((i+1))
  ( XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="--xla_dump_to=/tmp/dump/m$i --xla_dump_hlo_as_text" timeout 100 python3 benchmarks/gpu_stop46/compile_model.py "$n" > /tmp/dump/c$i.txt 2>&1; echo "default rc=$? $n" >> /tmp/dump/rc.txt ) &
  ( XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" timeout 100 python3 benchmarks/gpu_stop46/compile_model.py "$n" > /tmp/dump/t$i.txt 2>&1; echo "no-triton-gemm rc=$? $n" >> /tmp/dump/rc.txt ) &
done
wait
sort /tmp/dump/rc.txt | tee -a "$out/log.txt"
grep -h "compiled\|Check failed\|Unknown\|rror" /tmp/dump/c*.txt /tmp/dump/t*.txt | cut -c1-300 | tee -a "$out/log.txt"
(cd /tmp/dump && tar czf "$out/hlo_dump.tgz" $(ls -d m*/*before_optimizations.txt 2>/dev/null | xargs ls -S 2>/dev/null | head -12)) ; ls -la "$out"
flags=""
grep -q "no-triton-gemm rc=0 resnet18 dense 2-D" /tmp/dump/rc.txt && ! grep -q "default rc=0 resnet18 dense 2-D" /tmp/dump/rc.txt && flags="--xla_gpu_enable_triton_gemm=false"
log "B2: train steps, XLA_FLAGS='$flags'"
XLA_FLAGS="$flags" XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout 150 python3 -m benchmarks.bench --only models --no-peers --out "$out/results_gpu_models.json" --md /dev/null 2>&1 | grep "model \|rror\|Check failed" | tee -a "$out/log.txt"
log "B2 exit ${PIPESTATUS[0]}"
log "C: layers at 16x the batch, peers on the GPU"
XLA_FLAGS="$flags" XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout 220 python3 -m benchmarks.bench --only jester resnet2d resnet3d --batch-scale 16 --out "$out/results_gpu_layers_b16.json" --md /dev/null 2>&1 | grep -v "^|" | tail -n 40 | tee -a "$out/log.txt"
log "C exit ${PIPESTATUS[0]}"
log "D: conv tests on the GPU, full float32 precision"
JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest timeout 75 \
  python3 -m pytest -q -p no:cacheprovider -n 6 tests/test_conv.py > "$out/tests.txt" 2>&1
log "D exit $?"; grep -E "FAILED|passed|failed" "$out/tests.txt" | tail -n 20 | tee -a "$out/log.txt"
