#!/usr/bin/env bash
# A short follow-up device command (about 200 s): the CUDA tests gpu_session.sh's 60 s cap cut short (the prepared
# model against eager, DirectLaunch against the JIT), then the batch-64 overhead of mobilenetv2_100 with DirectLaunch
# off, on, off on one machine, so the direct route's effect is not confounded with the machine (sessions differ by up
# to 0.08 in the eager ratio).
#   bash benchmarks/gpu_direct_ab.sh      (run's timeout_s about 230, nothing to carry)
set -u
export OUT=${OUT:?set OUT to the output folder}
S=$(date +%s)
log() { echo "[gpu_direct_ab $(date +%T)] $*" | tee -a "$OUT/log.txt"; }
log "start; $(nvidia-smi --query-gpu=name --format=csv,noheader)"
timeout -k 10 110 python3 -m pytest -q -p no:cacheprovider -rs tests/test_triton_launch.py \
  "tests/test_triton_blend.py::test_cuda_prepared_model_auto_matches_eager" >"$OUT/cuda_tests.txt" 2>&1 \
  || log "CUDA tests exited with $?"
tail -4 "$OUT/cuda_tests.txt" | tee -a "$OUT/log.txt"
for run in 0 1 0; do
  (( $(date +%s) - S > 190 )) && { log "out of time before DirectLaunch=$run"; break; }
  log "overhead mobilenetv2_100, DirectLaunch=$run"
  HF_LAYERFOLD_TRITON_DIRECT_LAUNCH=$run timeout -k 5 28 python3 -m benchmarks.bench_train_overhead --device cuda \
    --models mobilenetv2_100 --batch 64 --input-size 224 --threads 1 --rounds 40 --budget-s 9 --no-compile-variants \
    --out "$OUT/train_overhead_cuda_direct$run-$(date +%s).json" >>"$OUT/log.txt" 2>&1 || log "overhead exited with $?"
done
log "done in $(( $(date +%s) - S )) s"
