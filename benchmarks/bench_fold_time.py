"""Wall time of ``fold_model`` on one CPU core, per plan: the cost a user pays once after training.

Timed call: ``fold_model(prepared, plan)`` (copies the prepared model, applies the plan, merges), the public
path; its two phases (``apply_plan`` on a copy, and folding the planned copy) are timed separately too.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import hf_layerfold as lf

from .harness import PLAN_NAMES, RESULTS_DIR, LoadMeter, create_prepared, device_info, log, make_plan, write_json

MODELS = ("mobilenetv2_100", "tf_efficientnet_lite0")
REQUIRED_S = {"mobilenetv2_100": 1.0}


def _median_s(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run(out: str | None = None, *, models: tuple[str, ...] = MODELS, repeats: int = 7, quick: bool = False) -> dict:
    if quick:
        repeats = 2
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name in models:
            prepared = create_prepared(name)
            lf.fold_model(prepared, lf.FoldPlan())  # first call pays one-off import / allocator costs
            for plan_name in ("bn_fused", *PLAN_NAMES):
                plan = make_plan(prepared, plan_name)
                if plan is None:
                    continue
                log(f"[fold_time] {name} {plan_name}")
                with LoadMeter() as load:
                    total, samples = _median_s(lambda m=prepared, p=plan: lf.fold_model(m, p), repeats)
                    apply_s, _ = _median_s(lambda m=prepared, p=plan: lf.apply_plan(copy.deepcopy(m), p), repeats)
                    planned = lf.apply_plan(copy.deepcopy(prepared), plan)
                    merge_s, _ = _median_s(lambda m=planned: lf.fold_model(m), repeats)
                limit = REQUIRED_S.get(name)
                rows.append({"model": name, "plan": plan_name, "linear_sites": len(plan),
                             "median_s": round(total, 4), "min_s": round(min(samples), 4),
                             "max_s": round(max(samples), 4), "repeats": repeats,
                             "copy_and_apply_plan_s": round(apply_s, 4), "fold_planned_s": round(merge_s, 4),
                             "required_s": limit, "meets_requirement": None if limit is None else total < limit,
                             "load": load.result})
    finally:
        torch.set_num_threads(saved)
    result = {"benchmark": "fold_time", "device": {**device_info("cpu"), "torch_threads": 1}, "quick": quick,
              "rows": rows}
    write_json(out or RESULTS_DIR / "fold_time.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "fold_time.json"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run(args.out, models=tuple(args.models.split(",")), repeats=args.repeats, quick=args.quick)


if __name__ == "__main__":
    main()
