#!/usr/bin/env bash
# The next lent GPU session's one device command (a lease has 15 minutes in all; this ends inside 600 s). From the
# repo root on the GPU machine, `.whl/` and `.gpudata/` carried (`make gpu-carry` fills them here):
#   bash benchmarks/gpu_session.sh        (run's timeout_s 600, carry [".whl", ".gpudata"])
# Issue 5: two fixed plans on the full data beside their control, from the 1200-step baseline (59 s; it and its
# control reproduced 93.92 % and 94.5 % three times), 2400 steps each (about 120 s), then the latency cells.
# Session 15 (no GPU) tried fused blocks on the CPU proxy: only the expand activation of blocks.1.0 linear
# (blocks.1.0.bn1.act), so its expand and depthwise convs merge into one dense 3x3 stride-2 conv and the block keeps
# its second activation (EfficientNetV2's fused MBConv). l002 (1.53x on the H100) with it, l002_f10, lost 0.15, 0.25
# and 0.1 point against the control (seeds 2, 3, 5), as l002 alone did (0.15, 0.3, 0.35); with blocks.2.0.bn1.act
# as well, l002_f10_f20, 0.35 and 0.7. Their H100 speed-ups are unknown: blocks.1.0 folded whole saves 2.33 of
# 11.81 ms there; the fused block removes its largest tensor (96 channels at 112 px) but keeps the 56 px one. On the
# CPU at batch 1, fusing it bought about half of what folding it whole buys (plan_ablation_sites_cpu.json). l002_f10
# needs 0.34 ms of the 2.33 to reach 1.6x; l002_f10_f20 is the hedge in case it times below. Writes
# accuracy_sweep_cuda.json and log.txt into $OUT.
# Then, as a second call, benchmarks/gpu_ablation.sh times every site of the blocks l002 leaves alone (about 110 s),
# and benchmarks/gpu_profile_compiled.sh (issue 3) if time is left.
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
--continue-steps 2400 --lambdas= --plan l002_f10=$L002,blocks.1.0.bn1.act \
--plan l002_f10_f20=$L002,blocks.1.0.bn1.act,blocks.2.0.bn1.act --logging-steps 100 --latency-budget-s 6 \
--latency-sizes 224 --alpha-sharing block --distill-weight 0.5 --start baseline" bash benchmarks/gpu_all.sh
echo "[gpu_session] done in $(( $(date +%s) - START )) s" | tee -a "$OUT/log.txt"
