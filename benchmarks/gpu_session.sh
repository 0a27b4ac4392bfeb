#!/usr/bin/env bash
# The next lent GPU session's one device command (a lease has 15 minutes in all; this ends inside 600 s), the
# open questions in two gpu_all.sh calls. From the repo root on the GPU machine, `.whl/` and `.gpudata/` carried
# (`make gpu-carry` fills them here):
#   bash benchmarks/gpu_session.sh        (run's timeout_s 600, carry [".whl", ".gpudata"])
# 1. tests (at most TESTS_S): the CUDA tests of the Triton blend and of DirectLaunch (tests/test_triton_launch.py);
# 2. overhead (at most 2 x OVERHEAD_S): the batch-64 step ratio of train_overhead_cuda*.json again, now with
#    DirectLaunch switched on (each row records whether the direct route was adopted);
# 3. profile (at most PROFILE_S): one batch-64 step of timm and of the prepared model split into host and device
#    time, and the host µs one site costs, the Triton route launched by the JIT and directly;
# 4. sweep (what is left of END_S = 580 s: at least about 375 s, unless a step has to be killed after its
#    SIGTERM, which adds up to KILL_S = 20 s each): the fixed plan l002_b00, 1.624x at cuda b128 224
#    fp32 in merge_policy_cuda.json, trained 2400 steps on the full data from the λ = 0 model, then its control, then
#    the latency cells. Its --deadline-s is what is left minus 70 s; the baseline, plan and control need about 290 s.
# Each step writes its JSON into $OUT as it goes; gpu_all.sh logs into $OUT/log.txt.
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
# DirectLaunch is off by default until measured on a GPU: on here, for the tests, the overhead and the profile
HF_LAYERFOLD_TRITON_DIRECT_LAUNCH=1 ONLY=tests,overhead,profile TESTS_S=${TESTS_S:-60} OVERHEAD_S=${OVERHEAD_S:-30} \
OVERHEAD_ARGS=--no-compile-variants PROFILE_S=${PROFILE_S:-60} bash benchmarks/gpu_all.sh
# the sweep with the kernels launched by Triton's JIT (the default), as in the runs its time estimates come from:
# whatever DirectLaunch does on this machine for the first time cannot cost the sweep
HF_LAYERFOLD_TRITON_DIRECT_LAUNCH=0 ONLY=sweep TOTAL_S=$((${END_S:-580} - $(date +%s) + START)) \
SWEEP_ARGS="--train-size 0 --test-size 0 --input-size 64 --batch-size 256 --steps 1200 --search-steps 500 \
--continue-steps 2400 --lambdas= --plan l002_b00=$PLAN --logging-steps 100 --latency-budget-s 6 \
--latency-sizes 224 --alpha-sharing block --distill-weight 0.5 --start baseline" bash benchmarks/gpu_all.sh
echo "[gpu_session] done in $(( $(date +%s) - START )) s" | tee -a "$OUT/log.txt"
