#!/usr/bin/env bash
# Issue 3's device command for the next lent GPU session (it ends by about 580 s; nothing to carry). From the repo
# root on the GPU machine:
#   bash benchmarks/gpu_overhead.sh        (run's timeout_s 600)
# The α search's training-step cost is ≤ 1.05x on the CPU and at H100 batch 128, not at batch 64 on either GPU
# (H200: mobilenetv2_100 1.234x, lite0 1.135x), and mobilenetv2_100 at H200 batch 128 was just over, at 1.055x, in
# one run. In order, each step with its own time limit, the later ones only while time is left:
#   1. the eager step again, mobilenetv2_100 at batch 128 and 64: is 1.055x noise or the H200's level? (~25 s each)
#   2. one batch-64 step profiled, and one site's host time (the H100's figures were 276 µs against ReLU6's 70 µs;
#      the H200's were never measured) (~40 s)
#   3. both models compiled whole at batch 64, beside the prepared model compiled with α broadcast per channel
#      (--channel-alpha): does inductor's separate α-gradient pass explain the H100's compiled 1.37x? (three
#      compiles at ~45 s each on the H100, then the timing: ~3 min; its JSON is written only at the end)
#   4. both compiled with CUDA graphs (--compile-mode reduce-overhead): what is left at batch 64 once the host
#      time per site is gone? (~2 min)
# Writes train_overhead_cuda_b128.json, train_overhead_cuda_b64.json, profile_step_b64.json,
# train_overhead_cuda_b64_compiled.json, train_overhead_cuda_b64_cudagraphs.json and log.txt into $OUT.
set -u
export OUT=${OUT:?set OUT to the output folder} PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT" || exit 1
START=$(date +%s)
END_S=${END_S:-580}
KILL_S=${KILL_S:-10}
log() { echo "[gpu_overhead $(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
left() { echo $((END_S - $(date +%s) + START)); }
# step LIMIT NAME CMD...: run CMD under LIMIT seconds, or skip it if less than LIMIT is left
step() {
  local limit=$1 name=$2
  shift 2
  if (($(left) < limit)); then
    log "$name skipped: $(left) s left, it needs $limit"
    return
  fi
  log "$name (limit $limit s)"
  timeout -k "$KILL_S" "$limit" python3 "$@" >>"$OUT/log.txt" 2>&1 || log "$name exited with $?"
}

log "start; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
python3 -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton',
triton.__version__)" 2>&1 | tee -a "$OUT/log.txt"
OVERHEAD="-m benchmarks.bench_train_overhead --device cuda --models mobilenetv2_100 --input-size 224 --threads 1
--no-compile-variants"
for batch in 128 64; do
  # shellcheck disable=SC2086
  step 60 "eager step, batch $batch" $OVERHEAD --batch $batch --rounds 40 --budget-s 20 \
    --out "$OUT/train_overhead_cuda_b$batch.json"
done
step 90 "profile of a batch-64 step" -m benchmarks.profile_step --device cuda --batch 64 --steps 5 --warmup 3 \
  --site-rounds 10 --out "$OUT/profile_step_b64.json"
# shellcheck disable=SC2086
step 270 "compiled whole, batch 64, with per-channel α" $OVERHEAD --batch 64 --rounds 30 --budget-s 25 --whole-compile \
  --channel-alpha --out "$OUT/train_overhead_cuda_b64_compiled.json"
# shellcheck disable=SC2086
step 150 "compiled whole with CUDA graphs, batch 64" $OVERHEAD --batch 64 --rounds 30 --budget-s 20 --whole-compile \
  --compile-mode reduce-overhead --out "$OUT/train_overhead_cuda_b64_cudagraphs.json"
log "done in $(($(date +%s) - START)) s"
