#!/usr/bin/env bash
# A second device command for a lent GPU session (about 120 s; session 23 ran it on an H200): which single sites of the blocks that l002 leaves
# non-linear buy speed at cuda b128 224 fp32, a fused block (its expand activation alone linear) beside the whole
# block, and every site's fold gain alone on that cell. From the repo root:
#   bash benchmarks/gpu_ablation.sh        (run's timeout_s 175, carry [".whl"]: it imports datasets)
# (Session 14 ran this script's earlier version, for l002_b00 by blocks: see git history.)
set -u
export OUT=${OUT:?set OUT to the output folder} PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT" || exit 1
set -o pipefail  # the python step's status, not grep's, is the script's
. benchmarks/gpu_wheels.sh
PLAN=bn1,blocks.1.1,blocks.2.1,blocks.3.1,blocks.3.2,blocks.4.1,blocks.4.2,blocks.5.0,blocks.5.1,blocks.5.2,blocks.5.3
timeout -k 10 150 python3 -m benchmarks.bench_plan_ablation --device cuda --sites --rounds 100 --budget-s 40 \
  --plan "l002=$PLAN" --out "$OUT/plan_ablation_sites_cuda.json" --gains-out "$OUT/fold_gains_sites_cuda_b128.json" \
  2>&1 | tee "$OUT/log.txt" | { grep -v Warning || true; }
