#!/usr/bin/env bash
# The next lent GPU session's one device command (a lease has 15 minutes in all; this ends inside 600 s). From the
# repo root on the GPU machine, `.whl/` and `.gpudata/` carried (`make gpu-carry` fills them here):
#   bash benchmarks/gpu_session.sh        (run's timeout_s 600, carry [".whl", ".gpudata"])
# Issue 5 with a baseline trained three times as long. Session 13's full-data run of the plan l002_b00 (1.609x at
# cuda b128 224 fp32) ended 0.76 point below its control, but that control gained 0.58 point from its extra steps alone: the
# 1200-step baseline was not converged. On the CPU proxy a 4x longer baseline halved the plan's gap to its control
# (two seeds; benchmarks/EXPERIMENTS.md, "A baseline trained longer"). So: the baseline trains 3600 steps
# (about 180 s; 1200 took 59 s), then l002_b00 and the control 2400 steps each from it (120 and 132 s in session 13),
# then the latency cells. The kernels launch the default way (DirectLaunch on Triton 3.6): its first long training run.
# Writes accuracy_sweep_cuda.json and log.txt into $OUT.
set -u
export OUT=${OUT:?set OUT to the output folder}
START=$(date +%s)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
[ -d .gpudata ] && export HF_LAYERFOLD_FASHION_MNIST_DIR=$PWD/.gpudata
PLAN=bn1,blocks.0.0,blocks.1.1,blocks.2.1,blocks.3.1,blocks.3.2,blocks.4.1,blocks.4.2,blocks.5.0,blocks.5.1,blocks.5.2
PLAN=$PLAN,blocks.5.3
ONLY=sweep TOTAL_S=$((${END_S:-580} - $(date +%s) + START)) \
SWEEP_ARGS="--train-size 0 --test-size 0 --input-size 64 --batch-size 256 --steps 3600 --search-steps 500 \
--continue-steps 2400 --lambdas= --plan l002_b00=$PLAN --logging-steps 100 --latency-budget-s 6 --latency-sizes 224 \
--alpha-sharing block --distill-weight 0.5 --start baseline" bash benchmarks/gpu_all.sh
echo "[gpu_session] done in $(( $(date +%s) - START )) s" | tee -a "$OUT/log.txt"
