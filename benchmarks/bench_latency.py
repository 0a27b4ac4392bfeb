"""Latency of folded models beside BN-fused, timm as-is, and a hand-built network of the same conv shapes.

For each model and plan: ``folded`` is ``fold_model(prepared, plan)`` (a ``LayerFoldedNet``), ``hand`` is
``harness.hand_built(folded)`` (plain torch modules, same shapes and weights). ``folded / hand`` ≤ 1.03 shows
the folded model adds no framework overhead; ``bn_fused / folded`` is the speed-up the plan buys.

CPU: ``python -m benchmarks.run --only latency``. CUDA: ``benchmarks/gpu_suite.py``.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import timm
import torch
import torch.nn as nn

import hf_layerfold as lf

from .harness import (
    PLAN_HELP,
    PLAN_NAMES,
    RESULTS_DIR,
    LoadMeter,
    device_info,
    hand_built,
    log,
    make_plan,
    paired_ratio,
    randomize_bn,
    summarize,
    time_interleaved,
    write_json,
)

MODELS = ("mobilenetv2_100", "tf_efficientnet_lite0")
REQUIRED_RATIO = 1.03
AA_CONTROL = "hand_copy[bn_fused]"


def build_variants(name: str, plans: tuple[str, ...] = ("bn_fused", *PLAN_NAMES),
                   input_size: int = 224) -> tuple[dict[str, nn.Module], dict]:
    """``timm``, and per plan ``folded[plan]`` / ``hand[plan]``, all in fp32 on the CPU; plus plan stats."""
    torch.manual_seed(0)
    timm_model = randomize_bn(timm.create_model(name, pretrained=False)).eval()
    prepared = lf.prepare_model(copy.deepcopy(timm_model))
    variants: dict[str, nn.Module] = {"timm": timm_model}
    meta: dict[str, dict] = {}
    for plan_name in plans:
        plan = make_plan(prepared, plan_name)
        if plan is None:
            log(f"  {name}: plan {plan_name} does not exist for this model, skipped")
            continue
        folded = lf.fold_model(prepared, plan)
        variants[f"folded[{plan_name}]"] = folded
        variants[f"hand[{plan_name}]"] = hand_built(folded, input_size)
        stats = lf.fold_stats(folded, input_size)
        meta[plan_name] = {"linear_sites": len(plan), **stats.to_dict()}
    meta["timm"] = lf.fold_stats(timm_model, input_size).to_dict()
    return variants, meta


def _auto_inner(models: dict[str, nn.Module], x: torch.Tensor, target_ms: float, tries: int = 3) -> int:
    """Forwards per sample so that one sample of the slowest model lasts about ``target_ms`` (GPU batch 1 needs
    several). Each model's forward time is the fastest of ``tries`` after a warm-up call: one timed call, hit by a
    single launch hiccup, overstates it and leaves every sample of the cell shorter than intended."""
    with torch.inference_mode():
        slowest = 0.0
        for m in models.values():
            m(x)
            fastest = math.inf
            for _ in range(tries):
                if x.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                fastest = min(fastest, (time.perf_counter() - t0) * 1e3)
            slowest = max(slowest, fastest)
    return max(1, math.ceil(target_ms / max(slowest, 1e-3)))


def measure_cell(variants: dict[str, nn.Module], meta: dict, *, model_name: str, batch: int, device: str,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, input_size: int = 224,
                 rounds: int = 50, warmup: int = 5, target_sample_ms: float = 0.0,
                 budget_s: float | None = None) -> dict:
    """Time every variant on one (device, batch, dtype, layout) and derive the ratios that matter.

    Ratios are *paired*: the median over rounds of a/b, a and b timed in the same round. On a shared machine
    that is far steadier than a ratio of medians; the A/A control (a second copy of ``hand[bn_fused]``) shows
    the noise floor of both.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dev = torch.device(device)
    variants = dict(variants)
    if "hand[bn_fused]" in variants:
        variants[AA_CONTROL] = variants["hand[bn_fused]"]  # deep-copied below like every variant
    models = {k: copy.deepcopy(m).to(device=dev, dtype=dtype).eval() for k, m in variants.items()}
    if channels_last:  # otherwise the weights stay exactly as fold_model / timm laid them out
        models = {k: m.to(memory_format=fmt) for k, m in models.items()}
    x = torch.randn(batch, 3, input_size, input_size, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    inner = _auto_inner(models, x, target_sample_ms) if target_sample_ms else 1
    t0 = time.perf_counter()
    with LoadMeter() as load:
        samples = time_interleaved(models, x, rounds=rounds, warmup=warmup, inner=inner, budget_s=budget_s)
    wall = time.perf_counter() - t0
    stats = {k: summarize(v) for k, v in samples.items()}
    med = {k: s["median_ms"] for k, s in stats.items()}
    base = "folded[bn_fused]" if "folded[bn_fused]" in samples else None

    def speedup(name: str) -> float | None:
        return None if base is None else round(paired_ratio(samples[base], samples[name]), 3)

    plans = {}
    for plan_name, pmeta in meta.items():
        if plan_name == "timm":
            continue
        f, h = f"folded[{plan_name}]", f"hand[{plan_name}]"
        paired = paired_ratio(samples[f], samples[h])
        plans[plan_name] = {
            "folded_ms": med[f], "hand_ms": med[h], "folded_over_hand": round(paired, 4),
            "folded_over_hand_of_medians": round(med[f] / med[h], 4), "meets_1_03": paired <= REQUIRED_RATIO,
            "speedup_vs_bn_fused": speedup(f), "hand_speedup_vs_bn_fused": speedup(h),
            "speedup_vs_bn_fused_of_medians": None if base is None else round(med[base] / med[f], 3),
            **pmeta,
        }
    aa = None
    if AA_CONTROL in samples:
        aa = {"paired": round(paired_ratio(samples[AA_CONTROL], samples["hand[bn_fused]"]), 4),
              "of_medians": round(med[AA_CONTROL] / med["hand[bn_fused]"], 4)}
    del models
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": model_name, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
        "memory_format": "channels_last" if channels_last else "contiguous", "input_size": input_size,
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "rounds": len(next(iter(samples.values()))), "inner": inner, "warmup": warmup, "wall_s": round(wall, 1),
        "load": load.result,
        "timm_speedup_vs_bn_fused": speedup("timm"), "aa_control": aa,
        "timm_stats": meta.get("timm"), "variants": stats, "plans": plans,
    }


def run_cpu(out: str | None = None, *, models: tuple[str, ...] = MODELS, threads: tuple[int, ...] = (2, 1),
            rounds: int = 60, input_size: int = 224, quick: bool = False) -> dict:
    """CPU batch-1 latency at each thread count; writes ``latency_cpu.json``."""
    if quick:
        rounds = min(rounds, 5)
    saved_threads = torch.get_num_threads()
    cells = []
    try:
        for name in models:
            log(f"[latency] building {name}")
            variants, meta = build_variants(name, input_size=input_size)
            for t in threads:
                torch.set_num_threads(t)
                log(f"[latency] {name} cpu b1 threads={t}, {rounds} rounds x {len(variants)} variants")
                cells.append(measure_cell(variants, meta, model_name=name, batch=1, device="cpu",
                                          input_size=input_size, rounds=rounds, warmup=2 if quick else 5))
    finally:
        torch.set_num_threads(saved_threads)
    result = {"benchmark": "latency", "device": {**device_info("cpu"), "torch_threads": list(threads)},
              "required_folded_over_hand": REQUIRED_RATIO, "plans_help": dict(PLAN_HELP), "quick": quick,
              "cells": cells}
    write_json(out or RESULTS_DIR / "latency_cpu.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "latency_cpu.json"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run_cpu(args.out, models=tuple(args.models.split(",")), threads=tuple(int(t) for t in args.threads.split(",")),
            rounds=args.rounds, input_size=args.input_size, quick=args.quick)


if __name__ == "__main__":
    main()
