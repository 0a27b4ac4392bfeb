"""Exactness of folding on real timm architectures: ``max|folded(x) − planned(x)| / max|planned(x)|``.

Random weights and random BatchNorm statistics; random plans and the all-sites plan; fp32 and fp64; two input
sizes, one odd (TF-"same" padding and stride-2 borders differ between even and odd sizes).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn as nn
from timm.models import _efficientnet_blocks as eb

import hf_layerfold as lf
from hf_layerfold.layers import is_activation

from .harness import RESULTS_DIR, create_prepared, device_info, log, random_plan, write_json

ARCHS = ("mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0", "tf_efficientnet_lite0", "resnet18",
         "resnet50", "mnasnet_100", "spnasnet_100", "fbnetc_100", "efficientnet_lite0")
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def _plans(model: torch.nn.Module, name: str) -> dict[str, lf.FoldPlan]:
    return {"random_p0.5": random_plan(model, f"{name}-a", 0.5), "random_p0.8": random_plan(model, f"{name}-b", 0.8),
            "all_sites": lf.FoldPlan(tuple(lf.foldable_sites(model)))}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b|, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _forward_with_last_preact(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and the input of the last non-linear activation run (SE gates aside).

    Random weights with random BatchNorm statistics drive many units into the flat parts of ReLU6 / ReLU, which
    hides differences in the logits; the last pre-activation shows them.
    """
    in_se = {id(m) for se in model.modules() if isinstance(se, eb.SqueezeExcite) for m in se.modules()}
    seen: list[torch.Tensor] = []  # cloned: timm's activations run in place

    def keep(mod: nn.Module, inp: tuple) -> None:
        seen[:] = [inp[0].clone()]

    hooks = [m.register_forward_pre_hook(keep)
             for m in model.modules() if is_activation(m) and id(m) not in in_se]
    try:
        with torch.inference_mode():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, (seen[-1] if seen else None)


def check_arch(name: str, sizes: tuple[int, ...], batch: int = 2) -> dict:
    """Every (dtype, plan, size) error of one architecture, or the reason it does not build.

    fp32 rows also compare both fp32 models with the fp64 planned model (the truth), which tells fp32 rounding of
    the deep planned model apart from an error of the fold.
    """
    try:
        base = create_prepared(name)
    except Exception as err:  # an unsupported architecture is a result, not a crash
        return {"arch": name, "supported": False, "error": f"{type(err).__name__}: {err}"}
    sites = lf.foldable_sites(base)
    rows = []
    for plan_name, plan in _plans(base, name).items():
        models = {}
        for dtype in (torch.float64, torch.float32):
            t0 = time.perf_counter()
            planned = lf.apply_plan(copy.deepcopy(base).to(dtype), plan)
            folded = lf.fold_model(planned)
            models[dtype] = (planned, folded, time.perf_counter() - t0)
        stats = lf.fold_stats(models[torch.float64][1], None)
        for size in sizes:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
            truth, truth_pre = _forward_with_last_preact(models[torch.float64][0], x.double())
            for dtype, (planned, folded, fold_s) in models.items():
                ref, ref_pre = _forward_with_last_preact(planned, x.to(dtype))
                out, out_pre = _forward_with_last_preact(folded, x.to(dtype))
                key = str(dtype).replace("torch.", "")
                err = _rel(out, ref)
                row = {"dtype": key, "plan": plan_name, "linear_sites": len(plan), "size": size, "rel_err": err,
                       "rel_err_last_preact": None if out_pre is None or out_pre.shape != ref_pre.shape
                       else _rel(out_pre, ref_pre),
                       "within_tolerance": err <= TOLERANCE[key], "convs_after": stats.convs,
                       "nonlinear_after": stats.nonlinear_layers, "fold_s": round(fold_s, 3)}
                if dtype == torch.float32:
                    row.update(planned_vs_fp64=_rel(ref, truth), folded_vs_fp64=_rel(out, truth),
                               planned_vs_fp64_last_preact=_rel(ref_pre, truth_pre),
                               folded_vs_fp64_last_preact=_rel(out_pre, truth_pre))
                rows.append(row)

    def worst(dtype: str, field: str) -> float | None:
        vals = [r[field] for r in rows if r["dtype"] == dtype and r.get(field) is not None]
        return max(vals) if vals else None

    fp32 = [r for r in rows if r["dtype"] == "float32"]
    return {"arch": name, "supported": True, "foldable_sites": len(sites),
            "convs_before": lf.fold_stats(base, None).convs,
            "max_rel_err": {d: worst(d, "rel_err") for d in TOLERANCE},
            "max_rel_err_last_preact": {d: worst(d, "rel_err_last_preact") for d in TOLERANCE},
            "fp32_max_vs_fp64": {"planned": worst("float32", "planned_vs_fp64"),
                                 "folded": worst("float32", "folded_vs_fp64")},
            # fp32: the folded model must be no further from the fp64 truth than the planned fp32 model (+ slack)
            "fp32_folded_not_worse": all(r["folded_vs_fp64"] <= 2 * r["planned_vs_fp64"] + TOLERANCE["float32"]
                                         for r in fp32),
            "all_within_tolerance": all(r["within_tolerance"] for r in rows), "rows": rows}


def run(out: str | None = None, *, archs: tuple[str, ...] = ARCHS, sizes: tuple[int, ...] = (224, 179),
        threads: int = 1, quick: bool = False) -> dict:
    """Errors do not depend on speed: one thread by default keeps a shared machine (and this run) responsive."""
    if quick:
        sizes = (64, 37)
    results = []
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in archs:
            log(f"[exactness] {name} sizes={sizes}")
            results.append(check_arch(name, sizes))
        device = device_info("cpu")
    finally:
        torch.set_num_threads(saved)
    result = {"benchmark": "exactness", "device": device, "sizes": list(sizes), "batch": 2,
              "tolerance": TOLERANCE, "quick": quick, "archs": results}
    write_json(out or RESULTS_DIR / "exactness.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "exactness.json"))
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--sizes", default="224,179")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run(args.out, archs=tuple(args.archs.split(",")), sizes=tuple(int(s) for s in args.sizes.split(",")),
        threads=args.threads, quick=args.quick)


if __name__ == "__main__":
    main()
