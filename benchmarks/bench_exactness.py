"""Exactness of folding on real timm architectures: ``max|folded(x) − planned(x)| / max|planned(x)|``.

Random weights and random BatchNorm statistics; random plans and the all-sites plan; fp32 and fp64; two input
sizes, one odd (TF-"same" padding and stride-2 borders differ between even and odd sizes).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import hf_layerfold as lf

from .harness import RESULTS_DIR, create_prepared, device_info, log, random_plan, write_json

ARCHS = ("mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0", "tf_efficientnet_lite0", "resnet18",
         "resnet50", "mnasnet_100", "spnasnet_100", "fbnetc_100", "efficientnet_lite0")
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def _plans(model: torch.nn.Module, name: str) -> dict[str, lf.FoldPlan]:
    return {"random_p0.5": random_plan(model, f"{name}-a", 0.5), "random_p0.8": random_plan(model, f"{name}-b", 0.8),
            "all_sites": lf.FoldPlan(tuple(lf.foldable_sites(model)))}


def check_arch(name: str, sizes: tuple[int, ...], dtypes: tuple[torch.dtype, ...], batch: int = 2) -> dict:
    """Every (dtype, plan, size) error of one architecture, or the reason it does not build."""
    try:
        base = create_prepared(name)
    except Exception as err:  # an unsupported architecture is a result, not a crash
        return {"arch": name, "supported": False, "error": f"{type(err).__name__}: {err}"}
    sites = lf.foldable_sites(base)
    rows = []
    for dtype in dtypes:
        model = copy.deepcopy(base).to(dtype)
        for plan_name, plan in _plans(model, name).items():
            t0 = time.perf_counter()
            planned = lf.apply_plan(copy.deepcopy(model), plan)
            folded = lf.fold_model(planned)
            fold_s = time.perf_counter() - t0
            stats = lf.fold_stats(folded, None)
            for size in sizes:
                x = torch.randn(batch, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(size))
                with torch.inference_mode():
                    ref, out = planned(x), folded(x)
                err = float((out - ref).abs().max() / ref.abs().max())
                key = str(dtype).replace("torch.", "")
                rows.append({"dtype": key, "plan": plan_name, "linear_sites": len(plan), "size": size,
                             "rel_err": err, "within_tolerance": err <= TOLERANCE[key],
                             "convs_after": stats.convs, "nonlinear_after": stats.nonlinear_layers,
                             "fold_s": round(fold_s, 3)})
    worst = {d: max(r["rel_err"] for r in rows if r["dtype"] == d) for d in {r["dtype"] for r in rows}}
    return {"arch": name, "supported": True, "foldable_sites": len(sites), "convs_before": lf.fold_stats(base, None).convs,
            "max_rel_err": worst, "all_within_tolerance": all(r["within_tolerance"] for r in rows), "rows": rows}


def run(out: str | None = None, *, archs: tuple[str, ...] = ARCHS, sizes: tuple[int, ...] = (224, 179),
        quick: bool = False) -> dict:
    if quick:
        sizes = (64, 37)
    dtypes = (torch.float32, torch.float64)
    results = []
    for name in archs:
        log(f"[exactness] {name} sizes={sizes}")
        results.append(check_arch(name, sizes, dtypes))
    result = {"benchmark": "exactness", "device": device_info("cpu"), "sizes": list(sizes), "batch": 2,
              "tolerance": TOLERANCE, "quick": quick, "archs": results}
    write_json(out or RESULTS_DIR / "exactness.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "exactness.json"))
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--sizes", default="224,179")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run(args.out, archs=tuple(args.archs.split(",")), sizes=tuple(int(s) for s in args.sizes.split(",")),
        quick=args.quick)


if __name__ == "__main__":
    main()
