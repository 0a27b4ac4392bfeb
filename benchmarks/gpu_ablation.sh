#!/usr/bin/env bash
# Session 14's second device command (about 200 s of the lease were left): which blocks l002_b00's cuda b128 speed-up
# rests on, and each block's fold gain on that cell (for a latency-aware search on the CPU proxy). From the repo root:
#   bash benchmarks/gpu_ablation.sh        (run's timeout_s 175, carry [".whl"]: it imports datasets)
set -u
export OUT=${OUT:?set OUT to the output folder} PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
PLAN=bn1,blocks.0.0,blocks.1.1,blocks.2.1,blocks.3.1,blocks.3.2,blocks.4.1,blocks.4.2,blocks.5.0,blocks.5.1,blocks.5.2
timeout -k 10 150 python3 -m benchmarks.bench_plan_ablation --device cuda --bf16 --rounds 100 --budget-s 30 \
  --plan "l002_b00=$PLAN,blocks.5.3" --out "$OUT/plan_ablation_cuda.json" --gains-out "$OUT/fold_gains_cuda_b128.json" \
  2>&1 | tee "$OUT/log.txt" | grep -v Warning
