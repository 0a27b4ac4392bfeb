"""RESULTS.md's "Fixed plans across seeds": one row per fixed plan trained on two seeds or more with the same recipe,
its top-1 change on each seed, their mean and standard error. One seed's gap to its control moves by about a third
of a point between seeds, as much as the target's whole 0.5-point margin, so a plan is judged on the seeds
together; this table gathers them from the sweeps' JSON files instead of by hand."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .report_common import device_label, md_table
from .report_sweeps import _limit, _signed, top1_loss_points

# Settings that later sweeps record and earlier ones did not: an earlier sweep ran at the value the option was added
# with (the behaviour before it existed), so a missing setting reads as that value and does not split a recipe.
SETTING_DEFAULTS = {"teacher": "baseline", "plan_ramp_steps": 0, "folded_steps": 0, "folded_lr": 3e-4,
                    "continue_steps": None, "start": "pretrained", "distill_weight": 0.0, "distill_temperature": 2.0,
                    "alpha_sharing": "site"}
NO_CONTROL = "*"  # marks a seed whose sweep had no control: its loss is against λ = 0 alone


def _recipe(data: dict) -> tuple[str, dict]:
    """What a run learns from, seed aside: the device kind and the sweep's settings (a key and the settings)."""
    settings = {**SETTING_DEFAULTS, **{k: v for k, v in (data.get("settings") or {}).items() if k != "seed"}}
    device = data.get("device")
    settings["device"] = device.get("device", "?") if isinstance(device, dict) else str(device or "?")
    return json.dumps(settings, sort_keys=True, default=str), settings


def plan_seed_groups(found: list[tuple[Path, dict]]) -> list[dict]:
    """Each (recipe, plan) with its top-1 loss per seed (:func:`top1_loss_points`: against the higher of λ = 0 and
    the control), for the fixed plans of non-quick sweeps that name their seed; a seed seen twice keeps its first
    file's run (by name)."""
    groups: dict[tuple, dict] = {}
    for _, data in sorted(found, key=lambda pd: pd[0].name):
        seed = (data.get("settings") or {}).get("seed")
        if data.get("benchmark") != "accuracy_sweep" or data.get("quick") or seed is None:
            continue
        key, settings = _recipe(data)
        rows = data.get("rows") or []
        controlled = any(r.get("control") for r in rows)
        for row in rows:
            loss = top1_loss_points(row)
            if not row.get("fixed_plan") or loss is None:
                continue
            blocks = tuple(sorted(row["fixed_plan"]))
            group = groups.setdefault((key, row["run"], blocks), {
                "plan": row["run"].removeprefix("plan="), "blocks": blocks, "recipe": key, "settings": settings,
                "limit": _limit(data), "sites": row.get("sites_past_threshold"), "depth": row.get("depth_after"),
                "losses": {}, "controlled": {}})
            if seed not in group["losses"]:  # (a gap to a control may come from another file's control)
                group["losses"][seed] = loss
                group["controlled"][seed] = controlled or row.get("top1_gap_vs_control_points") is not None
    return [g for g in groups.values() if len(g["losses"]) > 1]


def _cell_names(cell: str) -> tuple[str, str]:
    """The target's cell as the sweeps name it (``… float32``) and as the latency tools do (``… fp32``)."""
    return cell, cell.replace("float32", "fp32")


def _estimates(found: list[tuple[Path, dict]], cell: str) -> dict[tuple, dict]:
    """The plan-estimate file's rows by plan (its sorted blocks), when that file estimates the target's ``cell``."""
    for _, data in found:
        if data.get("benchmark") == "plan_estimate" and data.get("cell") in _cell_names(cell):
            return {tuple(sorted(r["sites"])): r for r in data.get("rows") or []
                    if r.get("sites") and r.get("speedup_estimate") and r.get("speedup_convs_only")}
    return {}


def _timings(found: list[tuple[Path, dict]], cell: str) -> dict[tuple, tuple[float, str, str]]:
    """Plans timed on the target's ``cell`` before training (``bench_plan_pick``, a measurement, where the estimate
    is a sum of lone savings): speed-up, device and file by plan (its sorted blocks); the first file by name wins."""
    timed: dict[tuple, tuple[float, str, str]] = {}
    for path, data in sorted(found, key=lambda pd: pd[0].name):
        if data.get("benchmark") != "plan_pick" or data.get("quick") or data.get("cell") not in _cell_names(cell):
            continue
        info = data.get("device")
        gpu = (info.get("gpu") if isinstance(info, dict) else None) or device_label(info)
        for row in data.get("rows") or []:
            if row.get("sites") and row.get("speedup_vs_bn_fused"):
                timed.setdefault(tuple(sorted(row["sites"])), (row["speedup_vs_bn_fused"], gpu, path.name))
    return timed


def _timed(timings: dict, group: dict) -> str:
    found = timings.get(group["blocks"])
    return f"{found[0]}× ({found[1].removeprefix('NVIDIA ')})" if found else "–"


def _target_cell(found: list[tuple[Path, dict]]) -> str:
    return next(((d.get("target") or {}).get("cell") for _, d in found if (d.get("target") or {}).get("cell")), "")


def _estimate(estimates: dict, group: dict) -> str:
    row = estimates.get(group["blocks"])
    return f"{row['speedup_estimate']}× ({row['speedup_convs_only']}×)" if row else "–"


def _setting(settings: dict, key: str):
    """A legend cell: the whole split for a size of 0, a dash for a setting not set."""
    value = settings.get(key)
    if key in ("train_size", "test_size") and value == 0:
        return "all"
    return "–" if value is None else value


def _recipes(groups: list[dict]) -> list[list[dict]]:
    """The groups by recipe, most runs first: recipe ``R1`` is the first, as the section numbers them."""
    recipes: dict[str, list[dict]] = {}
    for g in groups:
        recipes.setdefault(g["recipe"], []).append(g)
    return sorted(recipes.values(), key=lambda gs: -sum(len(g["losses"]) for g in gs))


def _recipe_label(groups: list[dict], group: dict) -> str:
    return next(f"R{n}" for n, gs in enumerate(_recipes(groups), 1) if gs[0]["recipe"] == group["recipe"])


def plan_seed_bullet(found: list[tuple[Path, dict]]) -> str | None:
    """The README's line on the table: how many rows held the limit on every seed, and of those the fastest timed at
    the target's cell or, where none was timed, the one estimated fastest there (with its convs-only figure: the
    estimate's weaker part)."""
    groups = plan_seed_groups(found)
    if not groups:
        return None
    held = [g for g in groups if max(g["losses"].values()) <= g["limit"]]
    devices = ", ".join(sorted({str(g["settings"]["device"]) for g in groups}))
    line = (f"Fixed plans across seeds ({devices} sweeps; RESULTS.md, \"Fixed plans across seeds\"): {len(held)} of "
            f"{len(groups)} rows (a plan under one recipe, two seeds or more) lost at most "
            f"{groups[0]['limit']} point on every seed, against the higher of λ = 0 and the control")
    cell = _target_cell(found)
    estimates, timings = _estimates(found, cell), _timings(found, cell)
    rated = [g for g in held if g["blocks"] in estimates]
    timed = [g for g in held if g["blocks"] in timings]
    if timed:
        best = max(timed, key=lambda g: timings[g["blocks"]][0])
        speedup, gpu, name = timings[best["blocks"]]
        mean = statistics.mean(best["losses"].values())
        line += (f"; of those timed at the target's cell, the fastest is `{best['plan']}` (recipe "
                 f"{_recipe_label(groups, best)}): {speedup}× ({gpu}, `{name}`); {_signed(round(mean, 2))} point on "
                 f"average over {len(best['losses'])} seeds")
    elif rated:
        best = max(rated, key=lambda g: estimates[g["blocks"]]["speedup_estimate"])
        row, mean = estimates[best["blocks"]], statistics.mean(best["losses"].values())
        line += (f"; of those with an estimate, the one estimated fastest at the target's cell is `{best['plan']}` "
                 f"(recipe {_recipe_label(groups, best)}): "
                 f"{row['speedup_estimate']}× ({row['speedup_convs_only']}× counting its fused blocks' convs "
                 f"alone), not timed; {_signed(round(mean, 2))} point on average over {len(best['losses'])} seeds")
    return line + "."


def plan_seed_section(found: list[tuple[Path, dict]]) -> list[str]:
    """The table, grouped by recipe (most runs first, each by mean loss), and a legend of what tells recipes apart."""
    groups = plan_seed_groups(found)
    if not groups:
        return []
    cell = _target_cell(found)
    estimates, timings = _estimates(found, cell), _timings(found, cell)
    ordered = _recipes(groups)
    keys = sorted({k for gs in ordered for k in gs[0]["settings"]})
    varying = [k for k in keys if len({json.dumps(gs[0]["settings"].get(k), default=str) for gs in ordered}) > 1]
    rows, legend = [], []
    for number, recipe_groups in enumerate(ordered, 1):
        legend.append([f"R{number}", *(_setting(recipe_groups[0]["settings"], k) for k in varying)])
        for g in sorted(recipe_groups, key=lambda g: statistics.mean(g["losses"].values())):
            seeds = sorted(g["losses"])
            losses = [g["losses"][s] for s in seeds]
            mean, se = statistics.mean(losses), statistics.stdev(losses) / len(losses) ** 0.5
            per_seed = " / ".join(_signed(g["losses"][s]) + ("" if g["controlled"][s] else NO_CONTROL) for s in seeds)
            rows.append([f"R{number}", f"`{g['plan']}`", g["sites"], g["depth"], ", ".join(map(str, seeds)),
                         per_seed, _signed(round(mean, 2)), f"{se:.2f}",
                         f"{sum(v <= g['limit'] for v in losses)} of {len(losses)}", _estimate(estimates, g),
                         _timed(timings, g)])
    return ["## Fixed plans across seeds", "",
            "Each fixed plan trained with the same recipe on two seeds or more (from the sweeps below). Per seed, "
            "its top-1 change against that seed's λ = 0 run or, where the sweep has one, its control trained as "
            f"long, whichever is higher ({NO_CONTROL}: no control in that sweep, against λ = 0 alone); the seeds "
            "in the order listed. Then the mean, the standard error of that mean (standard deviation over the "
            "seeds ÷ √n), and how many seeds stay within the target's limit. The last column is the speed-up at "
            "the target's cell *estimated* (not measured) for the same blocks by `estimate_plan_gains.py`, and in "
            "brackets with the fused blocks' convs alone, as if their activation saved nothing; the one after it the "
            "speed-up *measured* there (on the GPU named) where the same blocks were timed before training "
            "(`bench_plan_pick`, on random weights: latency does not depend on them). Recipes, most runs first:",
            "",
            *md_table(["recipe", "plan", "linear sites", "depth", "seeds", "top-1 change per seed (points)", "mean",
                       "standard error", "within limit", "estimated speed-up at the target's cell",
                       "timed at the target's cell"], rows),
            *(["The recipes differ in these settings (the rest are the same in all; – is a setting not set):", "",
               *md_table(["recipe", *varying], legend)] if varying else [])]
