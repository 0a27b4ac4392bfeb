"""The accuracy sweeps' part of the report: each sweep's table and plot, the bullet of a sweep timed at the target's
cell, and the one-row-per-sweep table of the CPU proxies, all judged the same way (:func:`top1_loss_points`)."""

from __future__ import annotations

from pathlib import Path

from .report_common import device_label, fmt, md_table, pyplot_or_none, save_figure


def _speedup_cells(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(c for r in rows for c in (r.get("speedup") or {})))


def _headline_cell(data: dict) -> str | None:
    """A sweep's target cell where it was measured, else its first measured cell (a CPU sweep: 224 px)."""
    target = (data.get("target") or {}).get("cell")
    cells = _speedup_cells(data.get("rows", []))
    return target if target in cells else next(iter(cells), None)


def _fold_gains_lines(gains: dict | None) -> list[str]:
    """The latency-aware weights a sweep trained with: which α groups they push, and what folding each saves."""
    if not gains:
        return []
    from hf_layerfold.gains import FoldGains  # here: the report itself needs no torch

    weights = gains.get("weights") or {}
    saved = FoldGains.from_dict(gains).saved_ms()
    pushed = [f"{owner} ({weights[g['sites'][0]]:.2f} per site, saves {saved[owner]:.2f} ms)"
              for owner, g in gains["groups"].items() if weights.get(g["sites"][0], 0) > 0]
    cell = f"{gains['device']} b{gains['batch_size']} {'x'.join(map(str, gains['input_size'][1:]))} {gains['dtype']}"
    noise = (f"two copies of it {2 * gains['noise_ms']:.2f} ms apart (median), a floor on the noise: repeated "
             "measurements differ by more")
    return [f"Latency-aware regularizer weights, measured on {cell} (BN-fused baseline {gains['baseline_ms']:.2f} ms; "
            f"{noise}): weight > 0 for " + (", ".join(pushed) or "no group")
            + f"; the other {len(gains['groups']) - len(pushed)} groups weigh 0.", ""]


def _steps(row: dict) -> str | int | None:
    """Training steps of a run; ``N + M folded`` when the folded network then trained M steps itself."""
    return f"{row.get('steps')} + {row['folded_steps']} folded" if row.get("folded_steps") else row.get("steps")


def accuracy_sweep_section(data: dict, plot: str | None) -> list[str]:
    target = data.get("target") or {}
    settings = data.get("settings") or {}
    lines = [f"Device (training and latency): {device_label(data.get('device'))}.", "",
             str(data.get("description", "")), "",
             "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".", ""]
    for key in ("calls", "caveats", "control_added_after_run", "note"):
        if data.get(key):
            lines += [str(data[key]), ""]
    lines += _fold_gains_lines(data.get("fold_gains"))
    if plot:
        lines += [f"![accuracy vs depth]({plot})", ""]
    rows = data.get("rows", [])
    reused = [f"{r['run']} from `{r['cached_from']}`" for r in rows if r.get("cached_from")]
    reused += [f"{r['run']} from `{r['reused_from']}`" for r in rows if r.get("reused_from")]
    if reused:
        lines += ["Taken from an earlier sweep with the same settings, not trained again here (`--control-from`, "
                  "`--baseline-cache`): " + "; ".join(reused) + ". A control taken over is not timed again.", ""]
    if data.get("control_not_reused"):
        what = ("it was then skipped by `--deadline-s`" if any(r in data.get("skipped", []) for r in
                                                                ("lambda=0 continued", "lambda=0 distilled"))
                else "it was trained here after all")
        lines += [f"The control was not reused ({data['control_not_reused']}); {what}.", ""]
    cells = _speedup_cells(rows)
    vs_control = any("top1_gap_vs_control_points" in r for r in rows)
    steps = len({_steps(r) for r in rows}) > 1  # --continue-steps / --folded-steps: the later runs train longer
    table = [[r["run"], *([_steps(r)] if steps else []), r["top1_pct"], r.get("top1_gap_points"),
              *([r.get("top1_gap_vs_control_points")] if vs_control else []), r["sites_past_threshold"],
              r["nonlinear_layers_after"], r["depth_after"], r["mmacs_after"],
              *[(r.get("speedup") or {}).get(c) for c in cells], fmt(r.get("meets_target"))] for r in rows]
    lines += md_table(["run", *(["steps"] if steps else []), "top-1 %", "loss (points)",
                     *(["loss vs control"] if vs_control else []), "linear sites", "non-linear layers", "depth",
                     f"MMACs ({settings.get('input_size', '?')} px)", *[f"speed-up {c}" for c in cells],
                     "meets target"], table)
    if target:
        ok = [r["run"] for r in rows if r.get("meets_target")]
        lines += [f"Target: ≥ {target.get('speedup')}× speed-up ({target.get('cell')}) at ≤ "
                  f"{target.get('max_top1_loss_points')} point top-1 loss: " + (", ".join(ok) if ok else "no run")
                  + " meets it.", ""]
    return lines


def plot_accuracy_sweep(data: dict, path: Path) -> bool:
    plt = pyplot_or_none()
    if plt is None:
        return False
    every = sorted(data.get("rows", []), key=lambda r: r["nonlinear_layers_after"])
    rows = [r for r in every if not r.get("control") and not r.get("fixed_plan")]
    if not rows:
        return False
    cell = _headline_cell(data) or (data.get("target") or {}).get("cell")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([r["nonlinear_layers_after"] for r in rows], [r["top1_pct"] for r in rows], "o-", label="λ sweep")
    fixed = [r for r in every if r.get("fixed_plan")]
    if fixed:
        ax.plot([r["nonlinear_layers_after"] for r in fixed], [r["top1_pct"] for r in fixed], "s", color="tab:orange",
                label="fixed plan (no search)")
    for r in (r for r in every if r.get("control")):
        ax.plot([r["nonlinear_layers_after"]], [r["top1_pct"]], "gx", markersize=9,
                label=f"{r['run'].replace('lambda=0', 'λ = 0')} (control)")
    for r in every:
        speed = (r.get("speedup") or {}).get(cell)
        label = run_label(r) + (f", ×{speed:.2f}" if speed is not None else "")
        ax.annotate(label, (r["nonlinear_layers_after"], r["top1_pct"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=7)
    base = next((r for r in rows if not folds(r)), None)
    if base:
        ax.plot([base["nonlinear_layers_after"]], [base["top1_pct"]], "k*", markersize=12, label="λ = 0 (not folded)")
    ax.set_xlabel("non-linear layers after folding")
    ax.set_ylabel("top-1 (%)")
    weighted = ", latency-weighted λ" if data.get("fold_gains") else ""
    ax.set_title(f"Fashion-MNIST, EfficientNet-Lite0{weighted} (labels: speed-up, {cell})", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(plt, fig, data, path, fontsize=7)


def _on_target(data: dict) -> bool:
    """A sweep whose speed-ups include the target's cell (the GPU sweeps); the rest are CPU proxies."""
    cell = _headline_cell(data)
    return cell is not None and cell == (data.get("target") or {}).get("cell")


def proxy_sweeps(found: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in found if d["benchmark"] == "accuracy_sweep" and not _on_target(d)]


def _proxy_bullet(proxies: list[tuple[Path, dict]]) -> str:
    kept = sum(_fastest_within(d) is not None for _, d in proxies)
    devices = sorted({device_label(d.get("device")).split(" (")[0] for _, d in proxies})
    n = f"{len(proxies)} sweep" + ("s" if len(proxies) > 1 else "")
    return (f"Accuracy vs depth, CPU proxy ({n}, {', '.join(devices)}; speed-ups measured on that "
            f"CPU, not at the target's cell): {kept} of {len(proxies)} sweeps have a folding run within "
            f"{_limit(proxies[0][1])} point of both λ = 0 and its control; one row per sweep in "
            "RESULTS.md, \"CPU-proxy sweeps at a glance\".")


def _limit(data: dict) -> float:
    return (data.get("target") or {}).get("max_top1_loss_points", 0.5)


def _fastest_within(data: dict) -> dict | None:
    """The folding run with the largest headline speed-up among those within the target's accuracy limit."""
    cell = _headline_cell(data)
    kept = [r for r in data.get("rows", []) if folds(r) and (top1_loss_points(r) or 0) <= _limit(data)]
    return max(kept, key=lambda r: (r.get("speedup") or {}).get(cell) or 0, default=None)


def _signed(points: float | None) -> str:
    """A top-1 loss in points as the change it is: 0.55 → −0.55."""
    return "–" if points is None else f"{'−' if points > 0 else '+'}{abs(points):g}"


TARGET_GAINS = "fold_gains_cuda_b128.json"  # each Lite0 block's saving alone at the target's cell (H100)


def _target_gains(results_dir: Path, cell: str | None):
    """The per-block savings measured at the target's ``cell`` (e.g. ``cuda b128 224 float32``), when the results
    folder has them for that cell; None otherwise (no file, another cell, or a file that does not read)."""
    path = Path(results_dir) / TARGET_GAINS
    if not path.exists():
        return None
    from hf_layerfold.gains import FoldGains  # here: only this column needs hf_layerfold (and torch)

    try:
        gains = FoldGains.load(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(gains.dtype, gains.dtype)
    measured = f"{gains.device} b{gains.batch_size} {gains.input_size[-1]} {dtype}"
    return gains if measured == cell and not gains.channels_last else None


def _estimate(gains, data: dict, row: dict | None) -> float | None:
    """A CPU-run plan's speed-up at the target's cell estimated from ``gains``; None where the file cannot say (no
    file, or a plan that folds part of a measured block: a fused block)."""
    sites = (data.get("linear_sites") or {}).get(row["run"]) if row else None
    if gains is None or sites is None:
        return None
    try:
        return round(gains.estimated_speedup(sites), 2)
    except ValueError:
        return None


def proxy_table(proxies: list[tuple[Path, dict]], gains=None) -> list[str]:
    """One row per CPU-proxy sweep: its setting, and its fastest run within the limit (else its closest run), with
    that run's speed-up estimated at the target's cell from ``gains`` (:func:`_target_gains`)."""
    rows = []
    for path, data in proxies:
        s, cell, runs = data.get("settings") or {}, _headline_cell(data), data.get("rows", [])
        ref = next((r for r in runs if r.get("control")), None) or next((r for r in runs if not folds(r)), None)
        best = _fastest_within(data)
        shown = best or min((r for r in runs if folds(r) and r.get("top1_gap_points") is not None),
                            key=top1_loss_points, default=None)
        run = "–" if shown is None else (run_label(shown) if best else f"none (closest: {run_label(shown)})")
        steps = (_steps(ref) if ref else None) or s.get("steps")
        images = "/".join(str(s.get(k) or "all") for k in ("train_size", "test_size"))  # 0: the whole split
        rows.append([f"`{path.name}`", s.get("seed"), images, s.get("alpha_sharing", "site"),
                     s.get("start", "pretrained"), steps, ref and ref["top1_pct"], run,
                     _signed(top1_loss_points(shown)) if shown else "–", shown and shown["depth_after"],
                     shown and (shown.get("speedup") or {}).get(cell), cell, _estimate(gains, data, shown)])
    return md_table(["sweep", "seed", "train / test images", "α sharing", "start", "steps", "reference top-1 %",
                   "fastest run within limit", "its top-1 change (points)", "depth", "speed-up", "speed-up cell",
                   "estimated speed-up at the target's cell"], rows)


def folds(row: dict) -> bool:
    """A run that folds: a λ > 0 search, or a fixed plan."""
    return row["lambda_reg"] > 0 or bool(row.get("fixed_plan"))


def run_label(row: dict) -> str:
    if row.get("control"):
        return "control"
    return row["run"].replace("=", " ") if row.get("fixed_plan") else f"λ = {row['lambda_reg']:g}"


def top1_loss_points(row: dict) -> float | None:
    """A run's top-1 loss for the target: against λ = 0 or, where the sweep has one, against the control trained as
    long as the run (whichever is larger), so extra training alone never counts as keeping accuracy."""
    gaps = [g for g in (row.get("top1_gap_points"), row.get("top1_gap_vs_control_points")) if g is not None]
    return max(gaps) if gaps else None


def _closest(rows: list[dict], cell: str | None) -> str:
    """The λ > 0 run with the smallest loss, when none is within the limit."""
    runs = [r for r in rows if folds(r) and r.get("top1_gap_points") is not None]
    if not runs:
        return ""
    r = min(runs, key=top1_loss_points)
    gap = r["top1_gap_points"]
    return (f" (closest: {run_label(r)}, {r['top1_pct']} %, {'−' if gap > 0 else '+'}{abs(gap):g} points"
            f"{_vs_control(r)}, {(r.get('speedup') or {}).get(cell)}× {cell})")


def _vs_control(row: dict) -> str:
    gap = row.get("top1_gap_vs_control_points")
    if gap is None:
        return ""
    kind = row.get("control_run", "lambda=0 continued").split()[-1]  # continued, or distilled (same teacher)
    return f" ({'−' if gap > 0 else '+'}{abs(gap):g} points against the {kind} λ = 0 control)"


def _sweep_bullets(path: Path, data: dict, dev: str) -> list[str]:
    """The bullet of a sweep measured at the target's cell: its fastest run within the limit, and the verdict."""
    target, rows, cell, limit = data.get("target") or {}, data.get("rows", []), _headline_cell(data), _limit(data)
    base = next((r for r in rows if not folds(r)), None)
    if base is None:
        return []
    head = f"Accuracy vs depth (`{path.name}`, {dev.split(' (')[0]}): λ = 0 reaches {base['top1_pct']} % top-1"
    control = next((r for r in rows if r.get("control")), None)
    # a control trained by an earlier sweep (perhaps on another GPU), not here
    reused = (f" (taken from `{control['reused_from']}`, not trained again)" if control and control.get("reused_from")
              else "")
    if not any(folds(r) for r in rows):  # a time-boxed call that kept only the reference runs
        skipped = data.get("skipped") or []
        return [head + (f", its control {control['top1_pct']} % after {control.get('steps')} more steps{reused}"
                        if control else "")
                + "; no folding run finished" + (f" (skipped by `--deadline-s`: {', '.join(skipped)})" if skipped
                                                 else "") + "."]
    head += f" at depth {base['depth_after']}" + (f", its control {control['top1_pct']} %{reused}" if reused else "")
    best = _fastest_within(data)
    within = (f"the fastest run within {limit} point, {run_label(best)}, reaches {best['top1_pct']} %"
              f"{_vs_control(best)} at depth {best['depth_after']} and {(best.get('speedup') or {}).get(cell)}× "
              f"({cell})" if best
              else f"no folding run stays within {limit} point" + _closest(rows, cell))
    met = fmt(any(r.get("meets_target") for r in rows))
    return [f"{head}; {within}; target ≥ {target.get('speedup')}× ({target.get('cell')}): {met}."]


def proxy_section(proxies: list[tuple[Path, dict]], results_dir: Path) -> list[str]:
    """RESULTS.md's "CPU-proxy sweeps at a glance": what the table compares, then :func:`proxy_table`."""
    if not proxies:
        return []
    return ["## CPU-proxy sweeps at a glance", "",
            "The accuracy sweeps whose speed-ups were measured on the CPU, not at the target's cell. Reference: "
            "the λ = 0 control (continued, or distilled from the same teacher) where the sweep has one, else "
            "λ = 0. The top-1 change is against "
            f"whichever of the two is higher; a run counts as within the limit at ≤ {_limit(proxies[0][1])} "
            "point lost. The last column estimates the run's speed-up at the target's cell from each folded "
            f"block's saving measured alone there (`{TARGET_GAINS}`: "
            "`FoldGains.estimated_speedup`, 0–5 % low for the 18 plans timed on the H100); it is not a "
            "measurement, and it is blank where the file lacks the saving (a fused block: part of a block "
            "folded). Full tables per sweep below.", "",
            *proxy_table(proxies, _target_gains(results_dir, (proxies[0][1].get("target") or {}).get("cell")))]
