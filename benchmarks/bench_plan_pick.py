"""Which fixed plans are worth a GPU call's training time: each candidate timed first, the fast enough trained.

A lent GPU call has about ten minutes, enough to train two or three fixed plans on the full data. Which plans reach
the speed-up target is known only on that device, and for fused blocks (an inverted residual's expand activation
alone linear) only an estimate exists until that device times them. So the candidates come in the order of the
accuracy they kept on the CPU, best first; this folds each on a randomly initialised EfficientNet-Lite0 (latency
does not depend on the weights), times all of them in one interleaved run beside the BN-fused model on the target's
cell, and picks, in that order,
up to ``--max-plans`` that reach ``--min-speedup``, then the fastest of the rest to fill the places left (each
still tells how a plan of that speed trains there). It writes the timings as JSON and the picked plans as
``--plan NAME=SITES`` lines for ``bench_accuracy_sweep`` (``--args-out``). (``bench_plan_ablation --sites
--gains-out`` stores every single site's saving on a cell, from which further plans can be estimated.)

``python -m benchmarks.bench_plan_pick --device cuda --plan a=bn1,blocks.1.0.bn1.act --plan b=... --args-out p.txt``
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_layerfold as lf
from hf_layerfold.files import write_text_atomic
from hf_layerfold.timing import resolve_device

from .bench_accuracy_sweep import (
    TARGET_SPEEDUP,
    _cudnn_benchmark,
    _lite0,
    cell_key,
    latency_cells,
    parse_plans,
    time_against_baseline,
)
from .harness import RESULTS_DIR, device_info, log, write_json


def pick(speedups: dict[str, float], min_speedup: float, max_plans: int) -> list[str]:
    """Up to ``max_plans`` names, in the given (preference) order those reaching ``min_speedup``, then the fastest
    of the others: the picked plans in the order they should train (a deadline drops the last)."""
    fast = [name for name, s in speedups.items() if s >= min_speedup]
    rest = sorted((n for n in speedups if n not in fast), key=lambda n: -speedups[n])
    return (fast + rest)[:max_plans]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", action="append", required=True, metavar="NAME=SITE,SITE,...",
                        help="a candidate (blocks or single sites, as bench_accuracy_sweep --plan), in order of "
                             "preference; repeatable")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--min-speedup", type=float, default=TARGET_SPEEDUP)
    parser.add_argument("--max-plans", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=30.0, help="timing budget of the interleaved run")
    parser.add_argument("--out", default=str(RESULTS_DIR / "plan_pick.json"))
    parser.add_argument("--args-out", default=None, help="write the picked plans here, one --plan NAME=SITES a line")
    parser.add_argument("--quick", action="store_true", help="32 px, batch 2, a few rounds (smoke test)")
    args = parser.parse_args(argv)
    try:  # before building models: without a GPU, torch fails later with a driver traceback
        resolve_device(args.device, timing=True)
    except (RuntimeError, ValueError) as err:
        parser.error(str(err))
    if args.max_plans < 1:
        parser.error("--max-plans must be at least 1")
    if args.quick:
        args.input_size, args.rounds, args.budget_s = 32, 2, 1.0
    plans = parse_plans(parser, args.plan)
    if "bn_fused" in plans:
        parser.error("--plan bn_fused=...: that name is the BN-fused baseline every plan is timed against")
    torch.set_num_threads(1)
    start = time.perf_counter()
    base = _lite0(argparse.Namespace(alpha_sharing="site", max_macs_increase=None))  # as the sweeps fold plans
    cell = latency_cells(args.device, args.input_size, str(args.input_size))[0]
    if args.quick:
        cell = dict(cell, batch=2)
    key = cell_key(args.device, cell)
    models = {"bn_fused": lf.fold_model(base, lf.FoldPlan())}
    stats = {}
    for name, sites in plans.items():
        models[name] = lf.fold_model(base, lf.FoldPlan.from_blocks(base, sites))
        stats[name] = lf.fold_stats(models[name], args.input_size)
    with _cudnn_benchmark(args.device):
        timed = time_against_baseline(models, args.device, cell, args.rounds, args.budget_s)
    speedups = {name: timed[name]["speedup_vs_bn_fused"] for name in plans}
    picked = pick(speedups, args.min_speedup, args.max_plans)
    result = {"benchmark": "plan_pick", "title": "Candidate plans timed before training", "quick": args.quick,
              "description": __doc__.split("\n\n")[1].replace("\n", " "),
              "device": {**device_info(args.device), "latency_cudnn_benchmark": args.device == "cuda"},  # (timing's)
              "cell": key, "min_speedup": args.min_speedup, "picked": picked,
              "bn_fused_ms": timed["bn_fused"]["median_ms"],
              "rows": [{"plan": name, "sites": plans[name], "depth": stats[name].depth,
                        "mmacs": round(stats[name].macs / 1e6, 1), **timed[name]} for name in plans]}
    write_json(args.out, result)
    log(f"[plan_pick] {key}: " + ", ".join(f"{n} {s}x" for n, s in speedups.items()) + f"; picked {picked}")
    if args.args_out:
        write_text_atomic(args.args_out, "".join(f"--plan {n}={','.join(plans[n])}\n" for n in picked))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
