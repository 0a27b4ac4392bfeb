"""Which convs to merge: the same fold plans timed under each merge policy, against the BN-fused model.

A plan says which activations go; the merge policy says how each resulting run of linear convs is collapsed. All
of them fold exactly, and latency does not depend on the weights, so the plans an accuracy sweep found (its
``linear_sites``) are timed here on a randomly initialised EfficientNet-Lite0 under:

* ``dense``: ``max_macs_increase=None``, every run merged as far as ``max_kernel_size`` allows (what the sweeps ran);
* ``macs0``: ``max_macs_increase=0``, no merge may add MACs;
* ``measured``: ``merge_costs`` from ``measure_merge_costs`` on the same cell, each run split where the device's
  measured latency is least.

Each cell (CUDA: batch 128 at 224, fp32 and bf16 channels_last; CPU: batch 1 at 224, fp32) times every variant
interleaved beside the BN-fused model, as the sweep does.

``python -m benchmarks.bench_merge_policy --device cuda --out /tmp/merge_policy_cuda.json``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch

import hf_layerfold as lf

from .bench_accuracy_sweep import latency_cells, time_against_baseline
from .harness import RESULTS_DIR, device_info, log, write_json

DESCRIPTION = ("The plans of accuracy sweeps, folded on a randomly initialised EfficientNet-Lite0 (latency does not "
               "depend on the weights) under three merge policies: dense (every run merged as far as max_kernel_size "
               "allows, what the sweeps ran), macs0 (no merge may add MACs) and measured (merge_costs measured on the "
               "same cell: each run split where its summed measured latency is least). Every policy folds exactly; "
               "paired speed-up over the BN-fused model, all variants timed interleaved.")
POLICIES = {"dense": {}, "macs0": {"max_macs_increase": 0.0}}
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _lite0(**config) -> torch.nn.Module:
    torch.manual_seed(0)
    return lf.prepare_model(timm.create_model("tf_efficientnet_lite0", num_classes=10),
                            lf.LayerFoldingConfig(alpha_sharing="block", **config))


def read_plans(paths: list[str]) -> dict[str, list[str]]:
    """Every non-empty plan of the sweep JSONs, by run name (prefixed with the file's stem where names repeat)."""
    plans: dict[str, list[str]] = {}
    for path in paths:
        for name, sites in json.loads(Path(path).read_text())["linear_sites"].items():
            if sites:
                plans[name if name not in plans else f"{Path(path).stem}:{name}"] = sites
    return plans


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "merge_policy.json"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--plans-from", action="append", default=None, metavar="JSON",
                        help="a sweep JSON whose linear_sites are the plans (repeatable; default: "
                             "results/accuracy_sweep_cuda_block.json)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=30.0, help="timing budget per cell")
    parser.add_argument("--cost-rounds", type=int, default=5, help="timing rounds per merge cost")
    parser.add_argument("--cost-round-seconds", type=float, default=None,
                        help="seconds per merge-cost round (default: 0.02 on CUDA, 0.05 on CPU)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="32 px, a few rounds (smoke test, numbers meaningless)")
    args = parser.parse_args(argv)
    if args.quick:
        args.input_size, args.rounds, args.budget_s, args.cost_rounds, args.cost_round_seconds = 32, 2, 1.0, 1, 0.001
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as in the latency suite: each conv shape gets its fastest kernel
    start = time.perf_counter()
    args.plans_from = args.plans_from or [str(RESULTS_DIR / "accuracy_sweep_cuda_block.json")]
    plans = read_plans(args.plans_from)
    result = {"benchmark": "merge_policy", "title": "Merge policy: the same plans, merged three ways",
              "quick": args.quick, "description": DESCRIPTION,
              "device": device_info(args.device), "plans_from": args.plans_from, "plans": plans, "rows": [],
              "merge_costs": {}}
    for cell in latency_cells(args.device, args.input_size, str(args.input_size)):
        dtype = DTYPES[cell["dtype"]]
        key = f"{args.device} b{cell['batch']} {cell['input_size']} {dtype}" + (
            " channels_last" if cell["channels_last"] else "")
        policies = dict(POLICIES)
        t0 = time.perf_counter()
        costs = lf.measure_merge_costs(_lite0(), (3, cell["input_size"], cell["input_size"]),
                                       batch_size=cell["batch"], device=args.device, dtype=dtype,
                                       channels_last=cell["channels_last"], rounds=args.cost_rounds,
                                       round_seconds=args.cost_round_seconds
                                       or (0.02 if args.device == "cuda" else 0.05))
        result["merge_costs"][key] = costs
        policies["measured"] = {"merge_costs": costs}
        log(f"[merge_policy] {key}: {len(costs)} merge costs measured in {time.perf_counter() - t0:.0f}s")
        models, stats = {"bn_fused": lf.fold_model(_lite0(), lf.FoldPlan())}, {}
        for plan, sites in plans.items():
            for policy, config in policies.items():
                planned = lf.apply_plan(_lite0(**config), lf.FoldPlan(tuple(sites)))
                name = f"{plan} {policy}"
                models[name] = lf.fold_model(planned)
                stats[name] = lf.fold_stats(models[name], cell["input_size"])
        timed = time_against_baseline(models, args.device, cell, args.rounds, args.budget_s)
        for name, st in stats.items():
            plan, policy = name.rsplit(" ", 1)
            result["rows"].append({"cell": key, "plan": plan, "policy": policy, "depth": st.depth,
                                   "mmacs": round(st.macs / 1e6, 1), "median_ms": timed[name]["median_ms"],
                                   "speedup_vs_bn_fused": timed[name]["speedup_vs_bn_fused"]})
        log(f"[merge_policy] {key}: " + ", ".join(f"{k} {v['speedup_vs_bn_fused']}x" for k, v in timed.items()))
        result["wall_s"] = round(time.perf_counter() - start, 1)
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
