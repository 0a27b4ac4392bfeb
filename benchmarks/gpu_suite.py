"""CUDA latency suite: one command, one JSON, needs only torch, timm and hf_layerfold (run from the repo root).

    PYTHONPATH=. python benchmarks/gpu_suite.py benchmarks/results/latency_cuda.json

mobilenetv2_100 and tf_efficientnet_lite0 at 224×224, batch 1 and 128, fp32 and bf16 channels_last,
``cudnn.benchmark`` on: timm as-is, BN-fused, and each fold plan beside its hand-built twin (see
``bench_latency``). The whole run keeps to ``--budget-s`` (rounds shrink to fit) and the JSON is rewritten after
every cell, so a run cut short still leaves what it measured. ``--device cpu`` with a tiny model is a dry run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.bench_latency import MODELS, REQUIRED_RATIO, build_variants, measure_cell  # noqa: E402
from benchmarks.harness import PLAN_HELP, device_info, log, write_json  # noqa: E402

CONFIGS = ((torch.float32, False), (torch.bfloat16, True))  # (dtype, channels_last)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,128")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=100, help="upper bound; the budget may lower it")
    parser.add_argument("--budget-s", type=float, default=270.0, help="wall-time budget of the whole suite")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("gpu_suite: CUDA is not available (use --device cpu for a dry run)")
        torch.backends.cudnn.benchmark = True
    models = tuple(args.models.split(","))
    batches = tuple(int(b) for b in args.batches.split(","))
    cells_total = len(models) * len(batches) * len(CONFIGS)
    result = {"benchmark": "latency", "device": device_info(args.device),
              "required_folded_over_hand": REQUIRED_RATIO, "plans_help": dict(PLAN_HELP),
              "budget_s": args.budget_s, "cells": []}
    done = 0
    for name in models:
        t0 = time.perf_counter()
        variants, meta = build_variants(name, input_size=args.input_size)
        log(f"[gpu_suite] built {name} ({len(variants)} variants) in {time.perf_counter() - t0:.1f}s")
        for dtype, channels_last in CONFIGS:
            for batch in batches:
                # the timed loop gets a share of what is left; warm-up and cudnn autotuning come on top
                left = deadline - time.perf_counter()
                if left < 5.0:
                    result.setdefault("skipped_cells", []).append(f"{name} b{batch} {dtype} cl={channels_last}")
                    write_json(args.out, result)
                    continue
                share = max(3.0, 0.6 * left / max(cells_total - done, 1))
                cell = measure_cell(variants, meta, model_name=name, batch=batch, device=args.device, dtype=dtype,
                                    channels_last=channels_last, input_size=args.input_size, rounds=args.rounds,
                                    warmup=5, target_sample_ms=10.0, budget_s=share)
                done += 1
                result["cells"].append(cell)
                result["wall_s"] = round(time.perf_counter() - start, 1)
                write_json(args.out, result)
                ratios = {p: v["folded_over_hand"] for p, v in cell["plans"].items()}
                log(f"[gpu_suite] {name} b{batch} {cell['dtype']} {cell['memory_format']}: "
                    f"{cell['rounds']} rounds x{cell['inner']}, folded/hand {ratios}, "
                    f"t={time.perf_counter() - start:.0f}s")
    return result


if __name__ == "__main__":
    main()
