"""Estimated cuda batch-128 speed-up of plans with fused blocks, from what an H100 measured, before a GPU times them.

Written before any GPU had timed a fused block (an inverted residual with only its expand activation linear, so its
expand and depthwise convs merge into one dense conv; session 23's H200 then did, ``plan_pick_cuda_b128_h200.json``,
and the estimate came out 0.1-3.7 % low). Two H100 files give an estimate of what one saves at cuda b128 224 fp32:
``merge_costs`` in ``merge_policy_cuda.json`` times every conv and every merge of them as a lone conv on that cell
(the fused block's dense conv among them), and ``fold_gains_cuda_b128.json`` times each block folded whole. A whole
fold saves its convs' time minus the merged conv's (the *conv part*, from the first file) and its two activations
(and a residual add); the rest of each block's measured saving is fitted, by least squares through zero over the
inverted residuals, as one cost per activation element (each block's miss is stored). A fused block saves its expand
and depthwise convs minus their merged conv, and its first activation at that cost. Whole blocks keep their measured
saving, and savings add (they did within 0.05 ms for whole blocks; the stem and ``blocks.0.0`` save about 0.5 ms
more together than alone, which is not added). *Convs only* counts a fused block's conv part alone, as if removing
its activation saved nothing. These are estimates, not timings: ``bench_plan_pick`` times plans on the GPU itself.

``python -m benchmarks.estimate_plan_gains --plan fused_early=blocks.1.0.bn1.act,... --plan l002_b00=bn1,...``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch

import hf_layerfold as lf

from .bench_accuracy_sweep import parse_plans
from .harness import RESULTS_DIR, log, write_json
from .report_common import device_label

CELL = "cuda b128 224 fp32"
BATCH = 128


def activation_numel(model: torch.nn.Module, size: int) -> dict[str, int]:
    """Elements of each site's activation tensor for one image (read off the module that holds the site)."""
    sites = set(lf.foldable_sites(model))
    numel, hooks = {}, []
    for name, module in model.named_modules():
        if f"{name}.act" in sites:
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, site=f"{name}.act": numel.__setitem__(site, out.numel())))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return numel


def block_parts(costs: dict[str, float], whole_ms: dict[str, float], numel: dict[str, int]) -> dict[str, dict]:
    """Per inverted residual timed both ways: its measured whole-fold saving, conv parts and activation elements."""
    parts = {}
    for block, saving in whole_ms.items():
        pw, dw, pwl = (f"{block}.{c}" for c in ("conv_pw", "conv_dw", "conv_pwl"))
        if not all(k in costs for k in (pw, dw, pwl, f"{pw}>{pwl}", f"{pw}>{dw}")):
            continue  # not an inverted residual (the stem, blocks.0.0)
        parts[block] = {"whole_ms": saving,
                        "conv_whole_ms": costs[pw] + costs[dw] + costs[pwl] - costs[f"{pw}>{pwl}"],
                        "conv_fused_ms": costs[pw] + costs[dw] - costs[f"{pw}>{dw}"],
                        "act1_elems": numel[f"{block}.bn1.act"] * BATCH,
                        "act2_elems": numel[f"{block}.bn2.act"] * BATCH}
    return parts


def fit_activation_cost(parts: dict[str, dict]) -> float:
    """ms per activation element: least squares of (whole saving − conv part) on the blocks' activation elements."""
    xs = [p["act1_elems"] + p["act2_elems"] for p in parts.values()]
    ys = [p["whole_ms"] - p["conv_whole_ms"] for p in parts.values()]
    return sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)


def check_plan(plan: list[str], costs: dict[str, float], whole_ms: dict[str, float]) -> None:
    """Every entry is a group the fold gains timed whole, or the expand activation of an inverted residual whose convs
    the merge costs timed, and no block is named both ways."""
    for entry in plan:
        block = entry.removesuffix(".bn1.act")
        fused = block != entry and f"{block}.conv_pw>{block}.conv_dw" in costs
        if entry not in whole_ms and not fused:
            raise SystemExit(f"--plan entry {entry!r}: only whole groups ({', '.join(whole_ms)}) or an inverted "
                             f"residual's expand activation (e.g. blocks.1.0.bn1.act) can be estimated")
        if fused and block in plan:
            raise SystemExit(f"--plan names {block!r} both whole and fused ({entry!r}); give one")


def estimate(plan: list[str], parts: dict[str, dict], whole_ms: dict[str, float], rate: float) -> tuple[float, float]:
    """(estimated saving, the same with fused blocks counted by their conv part only) in ms, for a plan that
    :func:`check_plan` passed."""
    saving = convs = 0.0
    for entry in plan:
        if entry in whole_ms:
            saving += whole_ms[entry]
            convs += whole_ms[entry]
        else:
            p = parts[entry.removesuffix(".bn1.act")]
            saving += p["conv_fused_ms"] + rate * p["act1_elems"]
            convs += p["conv_fused_ms"]
    return saving, convs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", action="append", required=True, metavar="NAME=SITE,SITE,...",
                        help="blocks folded whole and expand-activation sites, as bench_accuracy_sweep --plan")
    parser.add_argument("--merge-policy", type=Path, default=RESULTS_DIR / "merge_policy_cuda.json")
    parser.add_argument("--fold-gains", type=Path, default=RESULTS_DIR / "fold_gains_cuda_b128.json")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "plan_estimate_cuda_b128.json")
    args = parser.parse_args(argv)
    plans = parse_plans(parser, args.plan)
    try:
        policy = json.loads(args.merge_policy.read_text())
        costs, gains = policy["merge_costs"][CELL], lf.FoldGains.load(args.fold_gains)
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"needs the H100's {CELL} merge costs and fold gains: {err}") from None
    if (gains.device, gains.batch_size, gains.dtype, gains.channels_last, gains.input_size) != (
            "cuda", BATCH, "fp32", False, (3, 224, 224)):
        raise SystemExit(f"{args.fold_gains}: fold gains of another cell, not {CELL}")
    base_ms = gains.baseline_ms
    # each group named as a plan names it: a block, or "bn1" for the stem
    whole_ms = {(k.removesuffix(".bn1.act") if k.startswith("blocks.") else k.removesuffix(".act")): ms
                for k, ms in gains.saved_ms().items()}
    for sites in plans.values():
        check_plan(sites, costs, whole_ms)
    model = lf.prepare_model(timm.create_model("tf_efficientnet_lite0", num_classes=10), lf.LayerFoldingConfig())
    parts = block_parts(costs, whole_ms, activation_numel(model, 224))
    rate = fit_activation_cost(parts)
    blocks = []
    for name, p in parts.items():
        act_ms = rate * (p["act1_elems"] + p["act2_elems"])
        blocks.append({"block": name, "whole_ms_measured": round(p["whole_ms"], 3),
                       "conv_part_ms": round(p["conv_whole_ms"], 3), "activations_fit_ms": round(act_ms, 3),
                       "residual_ms": round(p["whole_ms"] - p["conv_whole_ms"] - act_ms, 3),
                       "fused_conv_part_ms": round(p["conv_fused_ms"], 3),
                       "fused_estimate_ms": round(p["conv_fused_ms"] + rate * p["act1_elems"], 3)})
    rows = []
    for name, sites in plans.items():
        saving, convs = estimate(sites, parts, whole_ms, rate)
        rows.append({"plan": name, "sites": sites, "saving_ms": round(saving, 3),
                     "speedup_estimate": round(base_ms / (base_ms - saving), 3),
                     "speedup_convs_only": round(base_ms / (base_ms - convs), 3)})
    result = {"benchmark": "plan_estimate", "title": f"Estimated, not timed: plans with fused blocks at {CELL}",
              "description": " ".join(__doc__.split("\n\n")[1].split()),
              "device": f"none (an estimate from measurements on {device_label(policy.get('device'))})",
              "cell": CELL,
              "argv": list(sys.argv[1:] if argv is None else argv),
              "sources": [args.merge_policy.name, args.fold_gains.name],
              "bn_fused_ms": round(base_ms, 3), "activation_ms_per_1e9_elements": round(rate * 1e9, 3),
              "blocks": blocks, "rows": rows}
    write_json(args.out, result)
    log("[plan_estimate] " + ", ".join(f"{r['plan']} {r['speedup_estimate']}x (convs only {r['speedup_convs_only']}x)"
                                       for r in rows))
    return result


if __name__ == "__main__":
    main()
