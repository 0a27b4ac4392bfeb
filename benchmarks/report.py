"""Build ``RESULTS.md`` and the PNG plots from every JSON file in a results folder.

Any JSON with a ``benchmark`` field is shown, whoever wrote it (a GPU run committed later, the training suites):
known kinds get their own tables, others the generic ``rows`` / key-value rendering described in README.md.
Needs only the standard library, plus matplotlib for the plots (skipped if it is missing) and hf_layerfold for
the latency-aware parts (a sweep's regularizer weights, the CPU-proxy table's estimated speed-ups).
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_layerfold.files import write_text_atomic

from .report_common import device_label, fmt, md_table, pyplot_or_none, save_figure
from .report_plans import plan_seed_bullet, plan_seed_section
from .report_sweeps import (
    _on_target,
    _proxy_bullet,
    _sweep_bullets,
    accuracy_sweep_section,
    plot_accuracy_sweep,
    proxy_section,
    proxy_sweeps,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CEILINGS_FILE = Path(__file__).resolve().parent / "reference_ceilings.json"
PLAN_ORDER = ("bn_fused", "lf_dm1", "s1_all", "ir_all", "all")


def _load_ceilings() -> dict:
    try:
        return json.loads(CEILINGS_FILE.read_text())
    except (OSError, ValueError):
        return {}


def cell_key(cell: dict) -> str:
    """Key of a latency cell in reference_ceilings.json, e.g. ``cpu_b1_2thr`` or ``cuda_b128_bfloat16_cl``."""
    if cell.get("threads") is not None:
        return f"cpu_b{cell['batch']}_{cell['threads']}thr"
    return f"cuda_b{cell['batch']}_{cell['dtype']}" + ("_cl" if cell["memory_format"] == "channels_last" else "")


def _cell_label(cell: dict) -> str:
    if cell.get("threads") is not None:
        return f"b{cell['batch']} {cell['threads']} thr {cell['dtype']}"
    layout = " CL" if cell["memory_format"] == "channels_last" else ""
    return f"b{cell['batch']} {cell['dtype']}{layout}"


# ------------------------------------------------------------------------------------------------ sections


def _arch_exact(arch: dict, tol: dict) -> bool:
    """fp64 errors (logits and last pre-activation) within tolerance, and fp32 folded no worse than fp32 planned."""
    fp64 = (arch.get("max_rel_err", {}).get("float64"), arch.get("max_rel_err_last_preact", {}).get("float64"))
    fp64_ok = all(v is not None and v <= tol.get("float64", 1e-10) for v in fp64)
    return bool(arch.get("supported")) and fp64_ok and bool(arch.get("fp32_folded_not_worse", False))


def exactness_section(data: dict) -> list[str]:
    tol = data.get("tolerance") or {}
    lines = [f"Device: {device_label(data.get('device'))}. Input sizes {data.get('sizes')} (batch "
             f"{data.get('batch')}), random weights and random BatchNorm statistics; plans: random (p=0.5), random "
             "(p=0.8) and all sites. Error = max|folded − planned| / max|planned|, worst over plans and sizes, on the "
             "logits and on the input of the last non-linear activation (*pre-act*: random BN statistics saturate "
             "many ReLU6 units, which can hide differences in the logits). *fp32 vs fp64 truth*: both fp32 models "
             "against the fp64 planned model — the fold is exact when the folded fp32 model is no further from the "
             f"truth than the planned fp32 model (within 2× + {tol.get('float32', 1e-5)}) and fp64 errors stay "
             f"≤ {tol.get('float64', 1e-10)}.", ""]
    rows = []
    for arch in data.get("archs", []):
        if not arch.get("supported"):
            rows.append([arch["arch"], "no: " + arch.get("error", "")[:90]] + ["–"] * 8)
            continue
        alls = [r for r in arch["rows"] if r["plan"] == "all_sites"]
        err, pre = arch.get("max_rel_err", {}), arch.get("max_rel_err_last_preact", {})
        vs64 = arch.get("fp32_max_vs_fp64", {})
        fp64 = (err.get("float64"), pre.get("float64"))
        exact = _arch_exact(arch, tol)
        rows.append([arch["arch"], "yes", arch.get("foldable_sites"),
                     f"{arch.get('convs_before')} → {alls[0]['convs_after'] if alls else '?'}",
                     *fp64, err.get("float32"), vs64.get("planned"), vs64.get("folded"), exact])
    return lines + md_table(["architecture", "folds", "sites", "convs (all sites)", "fp64 logits", "fp64 pre-act",
                           "fp32 logits", "fp32 planned vs fp64 truth", "fp32 folded vs fp64 truth", "exact"], rows)


def latency_section(data: dict, ceilings: dict, plot: str | None) -> list[str]:
    req = data.get("required_folded_over_hand", 1.03)
    lines = [f"Device: {device_label(data.get('device'))}.", "",
             "Median latency per forward (224×224 unless noted) of variants timed in rounds, each round in a fresh "
             "random order, under `torch.inference_mode`. *folded/hand*: median over rounds of the ratio of the "
             "`LayerFoldedNet` and a hand-built `nn.Sequential` with the same convs and weights timed in the same "
             f"round (required ≤ {req}); *of medians*: ratio of the two medians. *A/A*: a second copy of the "
             "hand-built BN-fused net against the first — the noise floor of both ratios in that cell. *speed-up*: "
             "BN-fused / folded latency (paired the same way); *hand speed-up*: the same for the hand-built twin, "
             "i.e. the structural ceiling of the plan measured on this device; *ceiling*: the structural "
             "ceiling for the same cell in `reference_ceilings.json`, measured elsewhere (the team's shared "
             "ANCHORS.md; its `all` = this suite's `ir_all`). *others*: CPU "
             "cores kept busy by other processes during the cell; above ~0.2 the absolute latencies are inflated "
             "(a 2-thread run then competes for the cores) and only the paired ratios are meaningful.", ""]
    if plot:
        lines += [f"![latency]({plot})", ""]
    table = []
    for cell in data.get("cells", []):
        model, key = cell["model"], cell_key(cell)
        ceil = ceilings.get("ceilings", {}).get(model, {})
        v = cell["variants"]
        label = _cell_label(cell) + (f" @{cell['input_size']}" if cell.get("input_size", 224) != 224 else "")
        others = (cell.get("load") or {}).get("other_processes_cores")
        timm_stats = cell.get("timm_stats") or {}
        table.append([model, label, "timm as-is", timm_stats.get("convs"), timm_stats.get("nonlinear_layers"),
                      _mmacs(timm_stats.get("macs")), v["timm"]["median_ms"], "–", "–", "–", "–",
                      cell.get("timm_speedup_vs_bn_fused"), "–", ceil.get("timm", {}).get(key), others])
        aa = cell.get("aa_control")
        if aa:
            table.append([model, label, "A/A (hand copy / hand, bn_fused)", "", "", "", "", "", aa["paired"],
                          aa["of_medians"], "", "", "", "", others])
        for plan in PLAN_ORDER:
            p = cell["plans"].get(plan)
            if p is None:
                continue
            table.append([model, label, plan, p.get("convs"), p.get("nonlinear_layers"), _mmacs(p.get("macs")),
                          p["folded_ms"], p["hand_ms"], p["folded_over_hand"], p.get("folded_over_hand_of_medians"),
                          p["meets_1_03"], p.get("speedup_vs_bn_fused"), p.get("hand_speedup_vs_bn_fused"),
                          ceil.get(plan, {}).get(key), others])
    lines += md_table(["model", "cell", "variant", "convs", "non-lin.", "MMACs", "folded ms", "hand ms", "folded/hand",
                     "of medians", f"≤ {req}", "speed-up vs BN-fused", "hand speed-up", "ceiling", "others"], table)
    misses = [(c["model"], _cell_label(c), p) for c in data.get("cells", []) for p, v in c["plans"].items()
              if not v["meets_1_03"]]
    lines += [f"Cells over {req}: " + (", ".join(f"{m} {c} {p}" for m, c, p in misses) if misses else "none") + ".",
              ""]
    return lines


def _mmacs(macs) -> float | None:
    return None if macs is None else round(macs / 1e6, 1)


def fold_time_section(data: dict) -> list[str]:
    lines = [f"Device: {device_label(data.get('device'))} (`torch.set_num_threads(1)`).", "",
             "`fold_model(prepared, plan)` end to end (copy, apply_plan, analytic merge), median of the repeats; "
             "the two phases are timed on their own too.", ""]
    rows = [[r["model"], r["plan"], r["linear_sites"], r["median_s"], r["min_s"], r["max_s"], r["repeats"],
             r["copy_and_apply_plan_s"], r["fold_planned_s"],
             "–" if r.get("required_s") is None else f"< {r['required_s']} s: {fmt(r['meets_requirement'])}",
             (r.get("load") or {}).get("other_processes_cores")] for r in data.get("rows", [])]
    return lines + md_table(["model", "plan", "linear sites", "median s", "min s", "max s", "repeats",
                           "copy + apply_plan s", "fold planned s", "requirement", "others"], rows)


SPREAD_ROW_FIELDS = ("direct_launch",)  # small per-row dicts shown as one column per key


def generic_section(data: dict) -> list[str]:
    """Any other benchmark: its ``rows`` (list of flat dicts) as a table, else its scalar fields."""
    lines = [f"Device: {device_label(data.get('device'))}.", ""]
    if data.get("description"):
        lines += [str(data["description"]), ""]
    rows = data.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        rows = [{**r, **{f"{k}.{kk}": vv for k in SPREAD_ROW_FIELDS if isinstance(r.get(k), dict)
                         for kk, vv in r[k].items()}} for r in rows]
        cols: list[str] = []
        for r in rows:
            cols += [k for k, v in r.items() if k not in cols and not isinstance(v, dict | list)]
        lines += md_table(cols, [[r.get(c) for c in cols] for r in rows])
    flat = {}
    for k, v in data.items():
        if k in ("benchmark", "device", "rows", "description", "title", "quick"):
            continue
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items() if not isinstance(vv, dict | list)})
        elif not isinstance(v, list):
            flat[k] = v
    if flat:
        lines += md_table(["field", "value"], [[k, v] for k, v in flat.items()])
    return lines


# ------------------------------------------------------------------------------------------------ plots


def plot_latency(data: dict, ceilings: dict, path: Path) -> bool:
    plt = pyplot_or_none()
    if plt is None:
        return False
    cells = data.get("cells", [])
    models = list(dict.fromkeys(c["model"] for c in cells))
    if not models:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mcells = [c for c in cells if c["model"] == model]
        plans = ["timm"] + [p for p in PLAN_ORDER[1:] if any(p in c["plans"] for c in mcells)]
        width = 0.8 / max(len(mcells), 1)
        for j, cell in enumerate(mcells):
            xs, ys, cs, hs = [], [], [], []
            for i, plan in enumerate(plans):
                p = cell["plans"].get(plan, {})
                y = cell["timm_speedup_vs_bn_fused"] if plan == "timm" else p.get("speedup_vs_bn_fused")
                c = ceilings.get("ceilings", {}).get(model, {}).get(plan, {}).get(cell_key(cell))
                if y is not None:
                    xs.append(i + (j - (len(mcells) - 1) / 2) * width)
                    ys.append(y)
                    cs.append(c)
                    hs.append(p.get("hand_speedup_vs_bn_fused"))
            ax.bar(xs, ys, width, label=_cell_label(cell))
            for x, c, h in zip(xs, cs, hs):
                if c is not None:
                    ax.hlines(c, x - width / 2, x + width / 2, colors="k", linewidth=2)
                if h is not None:
                    ax.plot([x], [h], "wx", markeredgecolor="k", markersize=6)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xticks(range(len(plans)), plans)
        ax.set_ylabel("speed-up vs BN-fused (×: hand-built twin, bar: reference ceiling)", fontsize=8)
        ax.set_title(model)
        ax.legend(fontsize=8)
    return save_figure(plt, fig, data, path, fontsize=8)


# ------------------------------------------------------------------------------------------------ document

TITLES = {"exactness": "Exactness: folded vs planned", "latency": "Latency", "fold_time": "Fold time",
          "accuracy_sweep": "Accuracy vs depth (Fashion-MNIST)", "train_overhead": "Training overhead",
          "fashion_mnist_method": "Layer Folding on Fashion-MNIST", "merge_policy": "Merge policy"}
ORDER = ("exactness", "latency", "fold_time", "accuracy_sweep", "merge_policy", "train_overhead",
         "fashion_mnist_method")


def load_results(results_dir: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("benchmark"):
            found.append((path, data))
    rank = {k: i for i, k in enumerate(ORDER)}
    return sorted(found, key=lambda pd: (rank.get(pd[1]["benchmark"], len(ORDER)), pd[0].name))


def summary(found: list[tuple[Path, dict]]) -> list[str]:
    """A few bullets read from the results (no number here is typed in by hand)."""
    bullets = []
    for path, data in found:
        first = len(bullets)  # this file's bullets start here (marked below when it is a smoke test)
        kind, dev = data["benchmark"], device_label(data.get("device"))
        if kind == "exactness":
            archs = data.get("archs", [])
            ok = [a for a in archs if a.get("supported")]
            worst = max(((max(a["max_rel_err"].get("float64") or 0.0,
                               a.get("max_rel_err_last_preact", {}).get("float64") or 0.0), a["arch"]) for a in ok),
                        default=(None, None))
            tol = data.get("tolerance") or {}
            exact = sum(_arch_exact(a, tol) for a in ok)
            flagged = sum(not a.get("all_within_tolerance", True) for a in ok)
            bullets.append(f"Exactness (`{path.name}`): {len(ok)}/{len(archs)} architectures fold, {exact} of them "
                           f"exactly (fp64 error ≤ {fmt(tol.get('float64', 1e-10))} on the logits and the last "
                           "pre-activation, and on the fp32 logits the folded model within 2× + "
                           f"{fmt(tol.get('float32', 1e-5))} of the planned model's distance from the fp64 result); "
                           f"worst fp64 error {fmt(worst[0])} ({worst[1]}). {flagged} of them exceed the fixed fp32 "
                           f"tolerance {fmt(tol.get('float32', 1e-5))} between the fp32 folded and planned models "
                           "(`all_within_tolerance`), where fp32 rounding moves both away from the fp64 result.")
        elif kind == "latency":
            cells = [(c, p, v) for c in data.get("cells", []) for p, v in c["plans"].items()]
            miss = [f"{c['model']} {_cell_label(c)} {p} ({fmt(v['folded_over_hand'])})" for c, p, v in cells
                    if not v["meets_1_03"]]
            bullets.append(f"Latency (`{path.name}`, {dev}): folded/hand ≤ {data.get('required_folded_over_hand')} "
                           f"in {len(cells) - len(miss)}/{len(cells)} cells" + (f"; over: {', '.join(miss)}."
                                                                                   if miss else "."))
        elif kind == "fold_time":
            for model in dict.fromkeys(r["model"] for r in data.get("rows", [])):
                rows = [r for r in data["rows"] if r["model"] == model]
                slow = max(rows, key=lambda r: r["median_s"])
                req = slow.get("required_s")
                bullets.append(f"Fold time (`{path.name}`, one core): {model} ≤ {fmt(slow['median_s'])} s median "
                               f"(slowest plan {slow['plan']})" + (f", requirement < {req} s: "
                                                                   f"{fmt(slow['median_s'] < req)}." if req else "."))
        elif kind == "train_overhead":
            bullets.append(_overhead_bullet(path, data, dev))
        elif kind == "merge_policy" and data.get("rows"):
            bullets.append(_merge_bullet(path, data, dev))
        elif kind == "accuracy_sweep" and _on_target(data):
            bullets += _sweep_bullets(path, data, dev)
        elif kind == "plan_ablation" and data.get("rows"):
            bullets.append(_ablation_bullet(path, data, dev))
        if data.get("quick"):  # a smoke test's numbers must not read like results, here as in the section titles
            bullets[first:] = [f"(quick mode: smoke-test numbers) {b}" for b in bullets[first:]]
    proxies = proxy_sweeps(found)
    if proxies:
        bullets.append(_proxy_bullet(proxies))
    seeds = plan_seed_bullet(found)
    if seeds:
        bullets.append(seeds)
    return [f"- {b}" for b in bullets] + [""] if bullets else []


def _overhead_cell(row: dict, cpu: bool) -> str:
    threads = f" {row['threads']} thr" if cpu else ""
    return f"{row['model']} b{row['batch']}{threads}{_launch_route(row.get('direct_launch'))}"


def _launch_route(state) -> str:
    """Which route the Triton kernels took, where recorded (``{kernel: argument classes launched directly, or
    "off"}``): 0 classes means every launch went through the JIT too."""
    if not isinstance(state, dict) or not state:
        return ""
    direct = [isinstance(v, int) and v > 0 for v in state.values()]
    return " (direct launch)" if all(direct) else " (partly direct)" if any(direct) else " (JIT launch)"


def _overhead_bullet(path: Path, data: dict, dev: str) -> str:
    """One line per file: the default blend's ratio per cell against the requirement, the other variants' ranges."""
    rows, req = data.get("rows", []), data.get("required_ratio")
    cpu = (data.get("device") or {}).get("device") == "cpu"
    variants = list(dict.fromkeys(k[len("ratio_"):] for r in rows for k in r
                                  if k.startswith("ratio_") and not k.startswith("ratio_min_")))
    if not variants:
        return f"Training-step cost of the α search (`{path.name}`): no ratios recorded."
    head, others = variants[0], []
    cells = [f"{_overhead_cell(r, cpu)} {fmt(r[f'ratio_{head}'])}×" for r in rows if f"ratio_{head}" in r]
    met = sum(r[f"ratio_{head}"] <= req for r in rows if f"ratio_{head}" in r) if req is not None else None
    for v in variants[1:]:
        vals = [r[f"ratio_{v}"] for r in rows if r.get(f"ratio_{v}") is not None]
        label = "A/A control (timm vs its copy)" if v == "aa" else v
        others.append(f"{label} {fmt(min(vals))}–{fmt(max(vals))}×" if len(set(vals)) > 1
                      else f"{label} {fmt(vals[0])}×")
    within = f"; ≤ {req} in {met}/{len(cells)}" if met is not None else ""
    sizes = sorted({r.get("input_size") for r in rows} - {None})
    size = f", {'/'.join(map(str, sizes))} px" if sizes else ""
    return (f"Training-step cost of the α search (`{path.name}`, {dev.split(' (')[0]}{size}): {head} "
            f"{', '.join(cells)}{within}" + (f" (other variants: {', '.join(others)})" if others else "") + ".")


def _merge_bullet(path: Path, data: dict, dev: str) -> str:
    """The first cell timed (on CUDA the target's): each plan's fastest merge policy, fastest plan first."""
    cell = data["rows"][0]["cell"]
    best: dict[str, dict] = {}
    for r in data["rows"]:
        if r["cell"] == cell and r["speedup_vs_bn_fused"] > best.get(r["plan"], {}).get("speedup_vs_bn_fused", 0):
            best[r["plan"]] = r
    ranked = sorted(best.values(), key=lambda r: -r["speedup_vs_bn_fused"])
    plans = ", ".join(f"{r['plan']} {fmt(r['speedup_vs_bn_fused'])}× ({r['policy']}, depth {r['depth']})"
                      for r in ranked)
    return (f"Merge policy (`{path.name}`, {dev.split(' (')[0]}), fastest policy per plan at {cell}, over the "
            f"BN-fused model: {plans}.")


def _ablation_bullet(path: Path, data: dict, dev: str) -> str:
    """The first cell timed: the plan, the block its speed-up leans on most, and the block that would add most."""
    cell = data["rows"][0]["cell"]
    rows = {r["variant"]: r["speedup_vs_bn_fused"] for r in data["rows"] if r["cell"] == cell}
    parts = [f"plan {data.get('plan_name', '')} {fmt(rows['plan'])}×"]
    for sign, what, pick in (("-", "without", min), ("+", "with", max)):
        varied = {v[1:]: x for v, x in rows.items() if v.startswith(sign)}
        if varied:
            block = pick(varied, key=varied.get)
            parts.append(f"{what} {block} {fmt(varied[block])}×")
    return f"Plan ablation (`{path.name}`, {dev.split(' (')[0]}) at {cell}: {', '.join(parts)}."


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(readme: Path, bullets: list[str]) -> bool:
    """Replace the block between the results markers of ``readme`` with ``bullets`` (atomically)."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    block = "\n".join([README_START, "", *[b for b in bullets if b], "", README_END])
    write_text_atomic(readme, head + block + tail)
    return True


def build_report(results_dir: str | Path = RESULTS_DIR, readme: str | Path | None = None) -> Path:
    """Write ``RESULTS.md`` (and plots) in ``results_dir`` from the JSON files there; returns the markdown path.

    With ``readme``, the summary bullets also replace the results block of that README."""
    results_dir = Path(results_dir)
    ceilings = _load_ceilings()
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks.run` (or `python -m benchmarks.report`) from the JSON files in this "
             "folder; every number below is read from them. Every table names the device it was measured on. "
             "See `benchmarks/README.md` for what each benchmark measures.", ""]
    found = load_results(results_dir)
    bullets = summary(found)
    lines += bullets
    lines += proxy_section(proxy_sweeps(found), results_dir)
    lines += plan_seed_section(found)
    if readme is not None:
        update_readme(Path(readme), bullets)
    for path, data in found:
        kind = data["benchmark"]
        quick = " (quick mode: smoke-test numbers)" if data.get("quick") else ""
        lines += [f"## {data.get('title') or TITLES.get(kind, kind)} — `{path.name}`{quick}", ""]
        if kind == "exactness":
            lines += exactness_section(data)
        elif kind == "latency":
            png = path.with_suffix(".png")
            lines += latency_section(data, ceilings, png.name if plot_latency(data, ceilings, png) else None)
        elif kind == "fold_time":
            lines += fold_time_section(data)
        elif kind == "accuracy_sweep":
            png = path.with_suffix(".png")
            lines += accuracy_sweep_section(data, png.name if plot_accuracy_sweep(data, png) else None)
        else:
            lines += generic_section(data)
    out = results_dir / "RESULTS.md"
    write_text_atomic(out, "\n".join(lines).rstrip() + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=(
        "Write RESULTS.md and the plots from the JSON files of a results folder; for the committed folder, also the "
        "results block of README.md."))
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="the folder of result JSON files "
                        "(default: benchmarks/results, whose summary also goes into README.md)")
    args = parser.parse_args(argv)
    results = Path(args.results_dir)
    committed = results.resolve() == Path(RESULTS_DIR).resolve()
    print(build_report(results, readme=Path(__file__).resolve().parent.parent / "README.md" if committed else None))


if __name__ == "__main__":
    main()
