"""RESULTS.md's "Fixed plans across seeds": one row per fixed plan trained on two seeds or more with the same recipe,
its top-1 change on each seed, their mean and standard error. One seed's gap to its control moves by about a third
of a point between seeds, as much as the target's whole 0.5-point margin, so a plan is judged on the seeds
together; this table gathers them from the sweeps' JSON files instead of by hand."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .report_common import md_table
from .report_sweeps import _limit, _signed, top1_loss_points

PLAN_ESTIMATE = "plan_estimate_cuda_b128.json"  # estimate_plan_gains.py: each plan's speed-up at the target's cell


def _recipe(data: dict) -> tuple[str, dict]:
    """What a run learns from, seed aside: the device kind and the sweep's settings (a key and the settings)."""
    settings = {k: v for k, v in (data.get("settings") or {}).items() if k != "seed"}
    settings["device"] = (data.get("device") or {}).get("device", "?")
    return json.dumps(settings, sort_keys=True, default=str), settings


def plan_seed_groups(sweeps: list[tuple[Path, dict]]) -> list[dict]:
    """Each (recipe, plan) with its top-1 loss per seed (:func:`top1_loss_points`: against the higher of λ = 0 and
    the control), for the fixed plans of non-quick sweeps; a seed seen twice keeps its first file's run (by name)."""
    groups: dict[tuple, dict] = {}
    for _, data in sorted(sweeps, key=lambda pd: pd[0].name):
        if data.get("benchmark") != "accuracy_sweep" or data.get("quick"):
            continue
        key, settings = _recipe(data)
        seed = (data.get("settings") or {}).get("seed")
        for row in data.get("rows", []):
            loss = top1_loss_points(row)
            if not row.get("fixed_plan") or loss is None:
                continue
            blocks = tuple(sorted(row["fixed_plan"]))
            group = groups.setdefault((key, row["run"], blocks), {
                "plan": row["run"].removeprefix("plan="), "blocks": list(blocks), "settings": settings,
                "sites": row.get("sites_past_threshold"), "depth": row.get("depth_after"), "losses": {}})
            group["losses"].setdefault(seed, loss)
    return list(groups.values())


def _varying(groups: list[dict]) -> list[str]:
    """The settings whose values differ between the recipes shown: what tells them apart."""
    keys = sorted({k for g in groups for k in g["settings"]})
    return [k for k in keys if len({json.dumps(g["settings"].get(k), default=str) for g in groups}) > 1]


def _setting(settings: dict, key: str):
    value = settings.get(key)
    if key in ("train_size", "test_size") and value == 0:
        return "all"  # 0: the whole split
    return "–" if value is None else value


def _estimates(results_dir: Path) -> dict[tuple, float]:
    """Estimated speed-ups at the target's cell by plan (its sorted blocks), where the estimate file is there."""
    try:
        data = json.loads((Path(results_dir) / PLAN_ESTIMATE).read_text())
    except (OSError, ValueError):
        return {}
    return {tuple(sorted(r["sites"])): r["speedup_estimate"] for r in data.get("rows", [])
            if r.get("sites") and r.get("speedup_estimate")}


def _shown(sweeps: list[tuple[Path, dict]]) -> list[dict]:
    return [g for g in plan_seed_groups(sweeps) if len(g["losses"]) > 1]


def plan_seed_bullet(sweeps: list[tuple[Path, dict]], results_dir: Path) -> str | None:
    """The README's line on the table: how many plans held the limit on every seed, and of those the one estimated
    fastest at the target's cell."""
    groups = _shown(sweeps)
    if not groups:
        return None
    limit = _limit(next(d for _, d in sweeps if d.get("benchmark") == "accuracy_sweep"))
    estimates = _estimates(results_dir)
    held = [g for g in groups if max(g["losses"].values()) <= limit]
    devices = ", ".join(sorted({str(g["settings"]["device"]) for g in groups}))
    line = (f"Fixed plans across seeds ({devices} sweeps; RESULTS.md, \"Fixed plans across seeds\"): {len(held)} of "
            f"{len(groups)} plans trained on two seeds or more lost at most {limit} point to the control on every seed")
    rated = [g for g in held if tuple(g["blocks"]) in estimates]
    if rated:
        best = max(rated, key=lambda g: estimates[tuple(g["blocks"])])
        mean = statistics.mean(best["losses"].values())
        line += (f"; of these, the one estimated fastest at the target's cell is `{best['plan']}` "
                 f"({estimates[tuple(best['blocks'])]}× estimated, not timed; {_signed(round(mean, 2))} point on "
                 f"average over {len(best['losses'])} seeds)")
    return line + "."


def plan_seed_section(sweeps: list[tuple[Path, dict]], results_dir: Path) -> list[str]:
    """The table, grouped by recipe (most runs first, each by mean loss), and a legend of what tells recipes apart."""
    groups = _shown(sweeps)
    if not groups:
        return []
    limit = _limit(next(d for _, d in sweeps if d.get("benchmark") == "accuracy_sweep"))
    estimates = _estimates(results_dir)
    recipes: dict[str, list[dict]] = {}
    for g in groups:
        recipes.setdefault(json.dumps(g["settings"], sort_keys=True, default=str), []).append(g)
    ordered = sorted(recipes.values(), key=lambda gs: -sum(len(g["losses"]) for g in gs))  # most runs first
    varying = _varying([gs[0] for gs in ordered])
    rows, legend = [], []
    for number, recipe_groups in enumerate(ordered, 1):
        legend.append([f"R{number}", *(_setting(recipe_groups[0]["settings"], k) for k in varying)])
        for g in sorted(recipe_groups, key=lambda g: statistics.mean(g["losses"].values())):
            seeds = sorted(g["losses"], key=lambda s: (s is None, s))
            losses = [g["losses"][s] for s in seeds]
            mean, se = statistics.mean(losses), statistics.stdev(losses) / len(losses) ** 0.5
            rows.append([f"R{number}", f"`{g['plan']}`", g["sites"], g["depth"], ", ".join(map(str, seeds)),
                         " / ".join(_signed(v) for v in losses), _signed(round(mean, 2)), f"{se:.2f}",
                         f"{sum(v <= limit for v in losses)} of {len(losses)}",
                         estimates.get(tuple(g["blocks"]), "–")])
    return ["## Fixed plans across seeds", "",
            "Each fixed plan trained with the same recipe on two seeds or more (each seed with its own λ = 0 run "
            "and control; from the sweeps below). Top-1 change against the higher of λ = 0 and the control, per "
            "seed in the order listed; mean, and the standard error of that mean (standard deviation over the "
            f"seeds ÷ √n); how many seeds stay within {limit} point. The last column is the speed-up at the "
            f"target's cell *estimated* in `{PLAN_ESTIMATE}` for the same blocks, not a measurement; blank where "
            "it has no such plan. Recipes, most runs first:", "",
            *md_table(["recipe", "plan", "linear sites", "depth", "seeds", "top-1 change per seed (points)", "mean",
                       "standard error", "within limit", "estimated speed-up at the target's cell"], rows), "",
            *(["The recipes differ in these settings (the rest are the same in all; – is a setting not set, or not "
               "recorded by an older sweep):", "", *md_table(["recipe", *varying], legend), ""] if varying else [])]
