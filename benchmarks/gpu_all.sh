#!/usr/bin/env bash
# Every GPU benchmark in one time-boxed command (a lent GPU session is short). From the repo root:
#   OUT=/some/dir bash benchmarks/gpu_all.sh
# Writes into $OUT: cuda_tests.txt (the CUDA tests of the Triton blend and its direct launch), latency_cuda.json,
# train_overhead_cuda_<model>.json, accuracy_sweep_cuda.json and log.txt; each step has its own time limit and a failing
# step does not stop the others. Budgets are in seconds (env overridable). Needs torch, timm, transformers, datasets,
# pytest and the Fashion-MNIST IDX files ($HF_LAYERFOLD_FASHION_MNIST_DIR). ONLY=tests,latency,overhead,profile,merge,
# sweep (any subset, default all) picks the steps; profile writes profile_step_b64.json (where a batch-64 step's time
# goes), merge merge_policy_cuda.json (the committed sweeps' plans timed under each merge policy). Exit status: 0 when
# every step ran, 1 when one failed or ran out of its time (what it wrote is kept), 3 without a CUDA device.
set -u
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT" || exit 1  # every step writes (and logs) into it: without it each step's redirection fails, unrun
LATENCY_S=${LATENCY_S:-90}
OVERHEAD_S=${OVERHEAD_S:-70}  # per model
OVERHEAD_ARGS=${OVERHEAD_ARGS:-}  # e.g. --no-compile-variants: ~20 s a model on an H200; with the compile
# variants (whole-model and regional torch.compile) a cold machine needs more than 65 s a model (session 23)
PROFILE_S=${PROFILE_S:-150}
TESTS_S=${TESTS_S:-180}
TOTAL_S=${TOTAL_S:-570}  # the sweep gets what is left of this
START=$(date +%s)
SWEEP_ARGS=${SWEEP_ARGS:-}
ONLY=${ONLY:-tests,latency,overhead,profile,merge,sweep}
want() { [[ ",$ONLY," == *",$1,"* ]]; }
KILL_S=${KILL_S:-20}  # after a step's SIGTERM, SIGKILL if it has not exited (a hung step must not eat the others' time)
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
log() { echo "[gpu_all $(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

log "start; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
FAILED=0  # steps that exited non-zero: the script's own exit status says whether anything failed
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>>"$OUT/log.txt"; then
  log "no CUDA device visible to torch: nothing to run"; exit 3
fi
python3 -c "import torch, timm, transformers, datasets; print('torch', torch.__version__, 'timm', timm.__version__,
'transformers', transformers.__version__, 'datasets', datasets.__version__)
import importlib.util as u; print('triton', u.find_spec('triton') and __import__('triton').__version__)" 2>&1 \
  | tee -a "$OUT/log.txt"

if want tests; then
  log "CUDA tests"
  timeout -k "$KILL_S" "$TESTS_S" python3 -m pytest -q -p no:cacheprovider tests/test_triton_blend.py \
    tests/test_triton_launch.py >"$OUT/cuda_tests.txt" 2>&1 \
    || { rc=$?; FAILED=$((FAILED + 1)); log "CUDA tests exited with $rc"; }
  tail -3 "$OUT/cuda_tests.txt" | tee -a "$OUT/log.txt"
fi

if want latency; then
  log "latency (budget ${LATENCY_S}s)"
  timeout -k "$KILL_S" $((LATENCY_S + 120)) python3 benchmarks/gpu_suite.py "$OUT/latency_cuda.json" --budget-s "$LATENCY_S" \
    >>"$OUT/log.txt" 2>&1 || { rc=$?; FAILED=$((FAILED + 1)); log "latency exited with $rc"; }
fi

for model in mobilenetv2_100 tf_efficientnet_lite0; do
  want overhead || break
  log "train overhead $model (budget ${OVERHEAD_S}s)"
  timeout -k "$KILL_S" "$OVERHEAD_S" python3 -m benchmarks.bench_train_overhead --device cuda --models $model --batch 64 \
    --input-size 224 --threads 1 --rounds 40 --budget-s $((OVERHEAD_S / 3)) $OVERHEAD_ARGS \
    --out "$OUT/train_overhead_cuda_$model.json" >>"$OUT/log.txt" 2>&1 || { rc=$?; FAILED=$((FAILED + 1)); log "train overhead exited with $rc"; }
done

if want profile; then
  log "profile one batch-64 step"
  timeout -k "$KILL_S" "$PROFILE_S" python3 -m benchmarks.profile_step --device cuda --batch 64 --out "$OUT/profile_step_b64.json" \
    >>"$OUT/log.txt" 2>&1 || { rc=$?; FAILED=$((FAILED + 1)); log "profile exited with $rc"; }
fi

if want merge; then
  log "merge policies of the committed plans"
  timeout -k "$KILL_S" 240 python3 -m benchmarks.bench_merge_policy --device cuda --budget-s 20 \
    --plans-from benchmarks/results/accuracy_sweep_cuda_block.json \
    --plans-from benchmarks/results/accuracy_sweep_block_from_baseline_dense_plans.json \
    --out "$OUT/merge_policy_cuda.json" >>"$OUT/log.txt" 2>&1 || { rc=$?; FAILED=$((FAILED + 1)); log "merge policy exited with $rc"; }
fi

SWEEP_S=$((TOTAL_S - $(date +%s) + START))
# at <= 70 s left the sweep's --deadline-s would be <= 0, i.e. none, and `timeout 0` means no time limit at all
if want sweep && ((SWEEP_S <= 70)); then
  log "accuracy sweep skipped: ${SWEEP_S}s left of TOTAL_S=${TOTAL_S} (it needs more than 70)"
elif want sweep; then
  log "accuracy sweep (${SWEEP_S}s left)"
  timeout -k "$KILL_S" "$SWEEP_S" python3 -m benchmarks.bench_accuracy_sweep --device cuda --bf16 --workers 12 \
    --deadline-s $((SWEEP_S - 70)) --out "$OUT/accuracy_sweep_cuda.json" $SWEEP_ARGS \
    >>"$OUT/log.txt" 2>&1 || { rc=$?; FAILED=$((FAILED + 1)); log "accuracy sweep exited with $rc"; }
fi
log "done; $FAILED step(s) failed"
[ "$FAILED" = 0 ]
