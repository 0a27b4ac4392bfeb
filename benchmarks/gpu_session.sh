#!/usr/bin/env bash
# The next lent GPU session's one device command (a lease has 15 minutes in all; this ends inside 600 s). From the
# repo root on the GPU machine, `.whl/` and `.gpudata/` carried (`make gpu-carry` fills them here):
#   bash benchmarks/gpu_session.sh        (run's timeout_s 600, carry [".whl", ".gpudata"])
# Issue 5: two fixed plans on the full data beside their control, from the 1200-step baseline (59 s; it and its
# control reproduced 93.92 % and 94.5 % three times), 2400 steps each (about 120 s), then the latency cells.
# Session 14 timed l002_b00 and every plan one block away from it on the H100 (benchmarks/EXPERIMENTS.md, "Where the
# H100's speed-up comes from"): blocks.0.0 buys l002_b00 about 0.46 ms, blocks.4.0 and blocks.6.0 would buy 0.29 and
# 0.18 ms. l002_b40_b60 is l002 with those two instead of blocks.0.0 (estimated 1.61x from the fold gains, which
# were 0.8 % low for l002 and l002_b30). On the CPU proxy (seeds 2 and 3, against the control) it lost 0.2 and 0.85
# point, l002_b00 1.0 and 0.3, l002 0.15 and 0.3: no better within the proxy's noise, but the only plan near 1.6x
# besides l002_b00 that has not yet had the full data. l002_b30_b40_b60 adds blocks.3.0 (estimated 1.71x), in case
# the first times below 1.6x. Writes accuracy_sweep_cuda.json and log.txt into $OUT.
# Then, as a second call, benchmarks/gpu_profile_compiled.sh (issue 3).
set -u
export OUT=${OUT:?set OUT to the output folder}
START=$(date +%s)
mkdir -p "$OUT" || exit 1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
[ -d .gpudata ] && export HF_LAYERFOLD_FASHION_MNIST_DIR=$PWD/.gpudata
L002=bn1,blocks.1.1,blocks.2.1,blocks.3.1,blocks.3.2,blocks.4.1,blocks.4.2,blocks.5.0,blocks.5.1,blocks.5.2,blocks.5.3
ONLY=sweep TOTAL_S=$((${END_S:-580} - $(date +%s) + START)) \
SWEEP_ARGS="--train-size 0 --test-size 0 --input-size 64 --batch-size 256 --steps 1200 --search-steps 500 \
--continue-steps 2400 --lambdas= --plan l002_b40_b60=$L002,blocks.4.0,blocks.6.0 \
--plan l002_b30_b40_b60=$L002,blocks.3.0,blocks.4.0,blocks.6.0 --logging-steps 100 --latency-budget-s 6 \
--latency-sizes 224 --alpha-sharing block --distill-weight 0.5 --start baseline" bash benchmarks/gpu_all.sh
echo "[gpu_session] done in $(( $(date +%s) - START )) s" | tee -a "$OUT/log.txt"
