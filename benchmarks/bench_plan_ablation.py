"""Which blocks a plan's speed-up rests on: the plan timed beside each variant one block away from it.

A fold plan that is just fast enough (issue 5's ``l002_b00``, 1.61-1.62x at cuda b128 224 fp32) cannot spare every
block, and the blocks that cost it accuracy are not necessarily the ones that buy its speed. For a plan given as
``--plan NAME=BLOCK,...`` this times, on one cell and in one interleaved run beside the BN-fused model:

* the plan itself;
* ``-BLOCK`` for each block of the plan: that block kept non-linear (what dropping it costs in speed);
* ``+BLOCK`` for each other block with foldable sites: that block folded as well (what adding it buys);
* with ``--sites``, ``+SITE`` for each site of those blocks alone: e.g. an inverted residual's expand activation
  (``blocks.1.0.bn1.act``), whose fold merges the expand and depthwise convs into one dense conv and leaves the block
  a fused one, with its other activation kept.

Latency does not depend on the weights, so the models are randomly initialised EfficientNet-Lite0s prepared as the
sweeps prepare them (``--alpha-sharing``). ``--gains-out FILE`` also stores ``measure_fold_gains`` on the same cell
(each α group folded alone: each block, or each site with ``--sites``), which ``bench_accuracy_sweep
--latency-weights FILE`` reads for a latency-aware search.

``python -m benchmarks.bench_plan_ablation --device cuda --plan l002_b00=bn1,blocks.0.0,... --out /tmp/ablation.json``
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_layerfold as lf
from hf_layerfold.gains import measure_fold_gains
from hf_layerfold.plan import check_plan
from hf_layerfold.prepare import site_blocks
from hf_layerfold.timing import resolve_device

from .bench_accuracy_sweep import _cudnn_benchmark, _lite0, cell_key, latency_cells, parse_plans, time_against_baseline
from .harness import RESULTS_DIR, device_info, log, write_json


def variants(model: torch.nn.Module, plan: list[str], sites: bool = False) -> dict[str, list[str]]:
    """Variant name → its blocks (or sites): the plan, each entry of it left out, each other foldable block added,
    and with ``sites`` each site of the blocks the plan leaves alone added by itself (``alpha_sharing="site"``)."""
    planned = set(lf.FoldPlan.from_blocks(model, plan).linear_sites)
    groups = site_blocks(model)  # block → its sites, as alpha_sharing="block" ties them
    out = {"plan": list(plan)}
    out |= {f"-{b}": [p for p in plan if p != b] for b in plan}
    out |= {f"+{b}": [*plan, b] for b, members in groups.items() if not set(members) <= planned}
    if sites:  # a block's only site is its "+block" already
        out |= {f"+{s}": [*plan, s] for members in groups.values() if len(members) > 1 and not planned & set(members)
                for s in members}
    return out


def _takes_whole_groups(model: torch.nn.Module, plan: list[str]) -> bool:
    """Whether ``plan`` takes every site sharing an α or none (what ``apply_plan`` checks), else it needs one α per
    site: e.g. one site of a block, under ``alpha_sharing="block"``."""
    try:
        check_plan(model, lf.FoldPlan.from_blocks(model, plan))
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "plan_ablation.json"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--plan", required=True, metavar="NAME=BLOCK,BLOCK,...")
    parser.add_argument("--alpha-sharing", default="block", choices=["site", "block"])
    parser.add_argument("--sites", action="store_true",
                        help="also each site of the blocks outside the plan added alone (e.g. an inverted residual's "
                             "expand activation: the block turns into a fused one); implies --alpha-sharing site, "
                             "as does a --plan that takes only some sites of a block")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=60.0, help="timing budget of the interleaved run")
    parser.add_argument("--bf16", action="store_true", help="also the bf16 channels_last cell (CUDA)")
    parser.add_argument("--gains-out", default=None, help="also measure_fold_gains on the fp32 cell, saved here")
    parser.add_argument("--quick", action="store_true", help="32 px, a few rounds (smoke test, numbers meaningless)")
    args = parser.parse_args(argv)
    try:  # before building models: without a GPU, torch fails later with a driver traceback
        resolve_device(args.device, timing=True)
    except (RuntimeError, ValueError) as err:
        parser.error(str(err))
    if args.quick:
        args.input_size, args.rounds, args.budget_s = 32, 2, 1.0
    (name, plan), = parse_plans(parser, [args.plan]).items()
    torch.set_num_threads(1)
    start = time.perf_counter()
    base = _lite0(argparse.Namespace(alpha_sharing=args.alpha_sharing, max_macs_increase=None))  # as the sweeps
    if args.alpha_sharing == "block" and (args.sites or not _takes_whole_groups(base, plan)):  # one α per site
        args.alpha_sharing = "site"
        base = _lite0(argparse.Namespace(alpha_sharing="site", max_macs_increase=None))
    plans = variants(base, plan, args.sites)
    cells = latency_cells(args.device, args.input_size, str(args.input_size))
    if args.quick:
        cells = [dict(c, batch=2) for c in cells]
    cells = cells if args.bf16 or args.device == "cpu" else cells[:1]
    result = {"benchmark": "plan_ablation", "title": f"One block away from the plan {name}", "quick": args.quick,
              "description": __doc__.split("\n\n")[1].replace("\n", " "),
              "device": {**device_info(args.device), "latency_cudnn_benchmark": args.device == "cuda"},  # (timing's)
              "plan_name": name, "plan": plan, "alpha_sharing": args.alpha_sharing, "rows": []}
    models = {"bn_fused": lf.fold_model(base, lf.FoldPlan())}
    stats = {}
    for variant, blocks in plans.items():
        models[variant] = lf.fold_model(base, lf.FoldPlan.from_blocks(base, blocks))
        stats[variant] = lf.fold_stats(models[variant], args.input_size)
    for cell in cells:
        key = cell_key(args.device, cell)
        with _cudnn_benchmark(args.device):
            timed = time_against_baseline(models, args.device, cell, args.rounds, args.budget_s)
        for variant, st in stats.items():
            result["rows"].append({"cell": key, "variant": variant, "blocks": len(plans[variant]),
                                   "nonlinear_layers": st.nonlinear_layers, "depth": st.depth,
                                   "mmacs": round(st.macs / 1e6, 1), **timed[variant]})
        log(f"[plan_ablation] {key}: " + ", ".join(f"{v} {t['speedup_vs_bn_fused']}x" for v, t in timed.items()))
        result["wall_s"] = round(time.perf_counter() - start, 1)
        write_json(args.out, result)
    if args.gains_out:
        cell = cells[0]
        rounds, round_s = (2, 0.005) if args.quick else (15, 0.03 if args.device == "cuda" else 0.1)
        with _cudnn_benchmark(args.device):
            gains = measure_fold_gains(base, (3, args.input_size, args.input_size), batch_size=cell["batch"],
                                       device=args.device, rounds=rounds, round_seconds=round_s)
        gains.save(args.gains_out)
        log(f"[plan_ablation] fold gains: baseline {gains.baseline_ms:.3f} ms (noise ±{gains.noise_ms:.3f}), "
            + ", ".join(f"{o} {s:+.3f}" for o, s in gains.saved_ms().items()))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
