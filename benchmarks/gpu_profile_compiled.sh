#!/usr/bin/env bash
# A short second device command for a lent GPU session (about 170 s; nothing to carry). From the repo root:
#   bash benchmarks/gpu_profile_compiled.sh        (run's timeout_s 200)
# Issue 3: where the compiled prepared step's time goes. Session 14 measured mobilenetv2_100 at batch 64 under
# torch.compile: timm 26.1 ms, prepared 35.6 ms (1.37x), without knowing why. profile_step --whole-compile splits
# both compiled steps into host and device time and lists the top ops (about 45 s to compile each model).
set -u
export OUT=${OUT:?set OUT to the output folder} PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT" || exit 1
timeout -k 10 170 python3 -m benchmarks.profile_step --device cuda --batch 64 --whole-compile --steps 5 --warmup 3 \
  --site-rounds 5 --out "$OUT/profile_step_compiled.json" 2>&1 | tee "$OUT/log.txt" | grep "profile_step\]"
