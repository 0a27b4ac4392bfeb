"""Accuracy against depth on Fashion-MNIST: a λ sweep of Layer Folding from the ImageNet-pretrained EfficientNet-Lite0.

Every run is ``bench_fashion_mnist_method.run_one`` (``LayerFoldingTrainer`` end to end, the same data, steps and
seed); λ = 0 is the baseline fine-tune without folding. With ``--distill-weight`` the λ > 0 runs also distill
from the λ = 0 run's model (the recipe of ``make demo``). ``--start baseline`` starts the λ > 0 runs from the
λ = 0 run's trained weights instead of the ImageNet ones: the paper's setting, where Layer Folding compresses a
network already trained for the task (the λ > 0 runs then train for the λ = 0 run's steps on top of it). A control
run, ``lambda=0 continued``, then trains the same way at λ = 0, so each λ > 0 row also reports its loss against
the control (``top1_gap_vs_control_points``): what is left after the extra training alone is accounted for. From
the ImageNet weights with ``--distill-weight``, the control is ``lambda=0 distilled``: the λ = 0 run's recipe,
distilled from the λ = 0 model as the folding runs are, so a teacher alone never counts as keeping accuracy.

Each folded model is then timed beside the baseline's BN-fused model (``fold_model`` of the λ = 0 model: same
weights as the baseline, BatchNorm merged into its convs), interleaved and paired (``harness.time_interleaved``), on
the run's device:

* CUDA: batch 128 at 224×224 (the protocol of the published figures) and at the training resolution, fp32 and
  bf16 channels_last;
* CPU: batch 1 at 224×224 and at the training resolution, fp32.

``--latency-weights DEVICE:BATCH:SIZE`` (e.g. ``cuda:128:224``) first measures, on that device, the latency each
α group's fold saves (``measure_fold_gains``) and gives every run the resulting ``regularizer_weights``: the
latency-aware search. The measurement is stored under ``fold_gains``; ``--latency-weights FILE`` reuses the
``fold_gains`` of an earlier sweep's JSON (or a ``FoldGains.save`` file) instead of measuring again.
``--merge-costs DEVICE:BATCH:SIZE`` (or a JSON file) gives every run ``LayerFoldingConfig.merge_costs`` measured
on that cell: each run of convs splits where the device's latency says, instead of merging as far as it can.
``--continue-steps`` (with ``--start baseline``) sets how long the runs that start from the λ = 0 model train (the
control included), so a longer fine-tune after the plan is fixed can be tried without retraining the baseline.
``--plan NAME=BLOCK,BLOCK,...`` (repeatable) adds runs without search: the sites of those blocks (``bn1`` is the
stem; a site's own name, e.g. ``blocks.1.0.bn1.act``, takes that site alone) are linear from the first step and the
run fine-tunes that fixed plan with the λ > 0 runs' recipe, so a plan between two that the search found can be tried
for accuracy (and timed) directly.
``--plan-ramp-steps N`` eases each fixed plan in: α of its sites rises from 0 to 1 over the first N steps (the others
stay 0), and the trainer fixes the plan from those α at step N, instead of every site being linear from the first.
``--teacher control`` (with ``--start baseline`` and ``--distill-weight``) has the λ > 0 and fixed-plan runs
distill from the control instead of the λ = 0 model: the unfolded network trained as long as they are, the model a
user would fold and compare against, so the student is not pulled toward a weaker teacher than its reference.
``--baseline-cache FILE`` stores the λ = 0 run (row and trained weights) in FILE, or reuses it from there when an
earlier sweep with the same baseline settings stored it (``BASELINE_SETTINGS``; other settings are refused): on a CPU
the full-data baseline is 20 of a sweep's 50 minutes, and it reproduces to the hundredth anyway.
``--control-from JSON`` likewise takes the control's row from an earlier sweep with the same settings whose λ = 0 run
came out the same (top-1 and top-5 to the hundredth), instead of training it again; that control is not timed. Other
settings are refused before anything trains; a λ = 0 run that comes out different (another GPU model's numerics, say)
trains the control here after all, and the JSON says why (``control_not_reused``).
``--control-first`` trains the control right after the λ = 0 run rather than last, so that a ``--deadline-s`` cuts a
folding run rather than every folding run's gap to the control (a time-boxed GPU call with a seed of its own).
``--folded-steps`` then trains each of those folded networks itself (the control's BN-fused one too) at
``--folded-lr``: its merged convs, no BatchNorm, fewer layers, so a step costs less than the planned network's.

Speed-up = BN-fused baseline latency / folded latency. The target (issue 5e): ≥ 1.6× CUDA batch-128 speed-up at
≤ 0.5 point top-1 loss against the λ = 0 run (and against the control, when there is one). A ``--deadline-s``
lets a time-boxed GPU session keep what it has: the JSON is rewritten after every run, and runs that would not
fit are listed as skipped. The control trains after the folding runs (unless they distill from it), so a cut drops
the control, not the runs the sweep is for; a control reused with ``--control-from`` costs no time and is recorded
right after the λ = 0 run, and one that cannot be reused trains right after it (it was asked for: a cut then drops
a folding run rather than every run's gap to the control).

``python -m benchmarks.bench_accuracy_sweep --out benchmarks/results/accuracy_sweep.json``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn

import hf_layerfold as lf
from hf_layerfold.data import load_fashion_mnist
from hf_layerfold.files import write_bytes_atomic
from hf_layerfold.gains import FoldGains, measure_fold_gains
from hf_layerfold.pretrained import load_efficientnet_lite0_imagenet
from hf_layerfold.timing import resolve_device

from .bench_fashion_mnist_method import RUN_SETTINGS, add_run_args, apply_quick, finetune_folded, run_config, run_one
from .harness import RESULTS_DIR, device_info, log, paired_ratio, summarize, time_interleaved, write_json
from .report_sweeps import folds, top1_loss_points

TARGET_SPEEDUP = 1.6
TARGET_LOSS_POINTS = 0.5
TARGET_CELL = "cuda b128 224 float32"
STARTED_FROM_BASELINE = ("the λ > 0 runs and a control ('lambda=0 continued', same recipe at λ = 0) start from the "
                         "λ = 0 run's fine-tuned model; ")
DISTILLED_FROM_LAMBDA0 = ("the λ > 0 runs distill from the λ = 0 model, and so does a control ('lambda=0 distilled', "
                           "the λ = 0 recipe with that teacher); ")
FIXED_PLAN_SHARING = ("The fixed-plan runs (plan=…) prepare the model with one α per site whatever alpha_sharing says: "
                      "their α are frozen at 0 or 1 from the first step, so sharing changes nothing in their training "
                      "and one α per site lets a plan name single sites (a fused block).")
CONTROL = "lambda=0 continued"  # with --start baseline: the λ > 0 recipe at λ = 0 (what the extra training alone does)
DISTILLED_CONTROL = "lambda=0 distilled"  # --start pretrained with a teacher: λ = 0 with the same teacher


def latency_cells(device: str, train_size: int, sizes: str = "224,train") -> list[dict]:
    sizes = sorted({train_size if s == "train" else int(s) for s in sizes.split(",")}, reverse=True)
    if device == "cuda":
        return [{"batch": 128, "input_size": s, "dtype": dt, "channels_last": cl}
                for s in sizes for dt, cl in ((torch.float32, False), (torch.bfloat16, True))]
    return [{"batch": 1, "input_size": s, "dtype": torch.float32, "channels_last": False} for s in sizes]


def cell_key(device: str, cell: dict) -> str:
    """A latency cell's name in the JSON, e.g. ``cuda b128 224 float32`` (the target's, ``TARGET_CELL``)."""
    dtype = str(cell["dtype"]).removeprefix("torch.")
    layout = " channels_last" if cell["channels_last"] else ""
    return f"{device} b{cell['batch']} {cell['input_size']} {dtype}{layout}"


def time_against_baseline(models: dict[str, nn.Module], device: str, cell: dict, rounds: int,
                          budget_s: float) -> dict[str, dict]:
    """Latency of every model and its paired speed-up over ``models["bn_fused"]`` in one interleaved run."""
    fmt = torch.channels_last if cell["channels_last"] else torch.contiguous_format
    dev = torch.device(device)
    moved = {k: copy.deepcopy(m).to(device=dev, dtype=cell["dtype"]).eval() for k, m in models.items()}
    if cell["channels_last"]:
        moved = {k: m.to(memory_format=fmt) for k, m in moved.items()}
    size = cell["input_size"]
    x = torch.randn(cell["batch"], 3, size, size, device=dev, dtype=cell["dtype"]).contiguous(memory_format=fmt)
    samples = time_interleaved(moved, x, rounds=rounds, warmup=5, budget_s=budget_s)
    out = {}
    for name, s in samples.items():
        out[name] = {"median_ms": summarize(s)["median_ms"],
                     "speedup_vs_bn_fused": round(paired_ratio(samples["bn_fused"], s), 3)}
    del moved
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def mark_targets(rows: list[dict]) -> None:
    """Each row's ``meets_target``: its speed-up at the target's cell (None until that cell is timed) at most the
    target's loss (against λ = 0 and, where there is one, the control)."""
    for row in rows:
        speedup = (row.get("speedup") or {}).get(TARGET_CELL)
        row["meets_target"] = None if speedup is None else (
            speedup >= TARGET_SPEEDUP and top1_loss_points(row) <= TARGET_LOSS_POINTS)


def _cell(cell: str, flag: str) -> tuple[str, int, int]:
    """``DEVICE:BATCH:SIZE`` → its parts, or a one-line exit naming ``flag``."""
    try:
        device, batch, size = cell.split(":")
        return device, int(batch), int(size)
    except ValueError:
        raise SystemExit(f"{flag} {cell!r}: expected DEVICE:BATCH:SIZE, e.g. cuda:128:224") from None


def _lite0(args: argparse.Namespace, **config) -> nn.Module:
    """The Lite0 the runs train, prepared with their sites, sharing and merge limit (random weights: latency does
    not depend on them)."""
    return lf.prepare_model(timm.create_model("tf_efficientnet_lite0", num_classes=10),
                            lf.LayerFoldingConfig(alpha_sharing=args.alpha_sharing,
                                                  max_macs_increase=args.max_macs_increase, **config))


@contextlib.contextmanager
def _cudnn_benchmark(device: str):
    """cuDNN autotuning on while timing on CUDA, as in the latency cells; the caller's setting after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def measure_gains(args: argparse.Namespace, cell: str) -> FoldGains:
    """Per-group fold savings of the Lite0 the runs train (same sites, sharing and merge limit), on ``cell``; or
    those stored in ``cell`` when it names a JSON file (a sweep's ``fold_gains``, or a ``FoldGains.save`` file)."""
    if cell.endswith(".json"):
        try:
            return FoldGains.load(cell)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise SystemExit(f"--latency-weights {cell!r}: not a readable fold-gains JSON ({err})") from None
    device, batch, size = _cell(cell, "--latency-weights")
    model = _lite0(args, merge_costs=getattr(args, "merge_costs_table", None))
    rounds, round_s = (3, 0.01) if args.quick else (15, 0.03 if device == "cuda" else 0.1)  # 1.4 s / 4.5 s a group
    with _cudnn_benchmark(device):  # timed as the latency cells are; training keeps its setting
        gains = measure_fold_gains(model, (3, size, size), batch_size=batch, device=device, rounds=rounds,
                                   round_seconds=round_s)
    log(f"[accuracy_sweep] fold gains on {cell}: baseline {gains.baseline_ms:.3f} ms (noise ±{gains.noise_ms:.3f}), "
        + ", ".join(f"{o} {s:+.3f}" for o, s in gains.saved_ms().items()))
    return gains


def parse_plans(parser: argparse.ArgumentParser, specs: list[str]) -> dict[str, list[str]]:
    """``NAME=BLOCK,BLOCK,...`` → {name: blocks}, each checked against Lite0's sites before anything trains."""
    plans: dict[str, list[str]] = {}
    probe = None
    for spec in specs:
        name, sep, blocks = spec.partition("=")
        names = [b.strip() for b in blocks.split(",") if b.strip()]
        if not sep or not name or not names or name in plans:
            parser.error(f"--plan {spec!r}: expected a new NAME=BLOCK,BLOCK,... (e.g. p1=bn1,blocks.1.1)")
        probe = probe or lf.prepare_model(timm.create_model("tf_efficientnet_lite0", num_classes=10))
        try:
            lf.FoldPlan.from_blocks(probe, names)
        except ValueError as err:
            parser.error(f"--plan {spec!r}: {err}")
        plans[name] = names
    return plans


# what the λ = 0 run's training depends on: a cached baseline is reused only where all of these match
BASELINE_SETTINGS = ("train_size", "test_size", "input_size", "steps", "search_steps", "batch_size", "lr",
                     "weight_decay", "regularizer", "alpha_init", "alpha_lr", "threshold", "alpha_sharing",
                     "max_macs_increase", "bf16", "seed", "device", "quick", "threads")


def cached_baseline(path: Path, args: argparse.Namespace) -> dict | None:
    """The λ = 0 run stored in ``path`` by an earlier sweep with the same baseline settings (its row, trajectory and
    trained weights, and its BN-fused model rebuilt from them), or ``None`` when there is no such file yet."""
    if not path.exists():
        return None
    cached = torch.load(path, weights_only=True)
    want = {k: getattr(args, k) for k in BASELINE_SETTINGS}
    differ = {k: (cached["settings"].get(k), v) for k, v in want.items() if cached["settings"].get(k) != v}
    if differ:
        raise SystemExit(f"--baseline-cache {path}: its λ = 0 run was trained with other settings "
                         f"(cached, now): {differ}; give another file")
    model = load_efficientnet_lite0_imagenet(num_classes=10)
    model.load_state_dict(cached["state"])
    config = run_config(args)  # folded as run_one folds the λ = 0 model: its merge settings, an empty plan
    lf.apply_plan(lf.prepare_model(model, config), lf.FoldPlan(), config)
    log(f"[accuracy_sweep] lambda=0: reused from {path} ({cached['row']['top1_pct']} % top-1)")
    return {"row": {**cached["row"], "cached_from": path.name}, "trajectory": cached["trajectory"],
            "linear_sites": [], "state": cached["state"], "folded": lf.fold_model(model.eval())}


def save_baseline(path: Path, args: argparse.Namespace, run: dict) -> None:
    """Store the λ = 0 run for :func:`cached_baseline`, atomically (an interrupted sweep leaves no half file)."""
    buffer = io.BytesIO()
    torch.save({"settings": {k: getattr(args, k) for k in BASELINE_SETTINGS}, "row": run["row"],
                "trajectory": run["trajectory"], "state": run["state"]}, buffer)
    write_bytes_atomic(path, buffer.getvalue())


# settings that shape only the fixed-plan runs: a control trained under other values is the same computation
NOT_CONTROL_SETTINGS = ("plan_ramp_steps",)


def load_control(path: Path, settings: dict, device: str, quick: bool) -> dict:
    """The control run of the earlier sweep stored in ``path`` (``--control-from``), checked before anything trains:
    refused unless that sweep ran on the same kind of device with the same settings (all but
    :data:`NOT_CONTROL_SETTINGS`, whichever sweep recorded them)."""
    try:
        data = json.loads(path.read_text())
        rows = {r["run"]: r for r in data["rows"]}
        theirs = {**data["settings"], "device": data["device"]["device"], "quick": data["quick"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--control-from {path}: not a readable sweep JSON ({err})") from None
    ours = {**settings, "device": device, "quick": quick}
    differ = {k: (theirs.get(k), ours.get(k)) for k in sorted(set(theirs) | set(ours))
              if k not in NOT_CONTROL_SETTINGS and theirs.get(k) != ours.get(k)}
    if differ:
        raise SystemExit(f"--control-from {path}: that sweep ran with other settings (there, here): {differ}")
    control = next((r for r in rows.values() if r.get("control")), None)
    base = rows.get("lambda=0", {})
    if control is None or "top1_pct" not in base or "top5_pct" not in base:
        raise SystemExit(f"--control-from {path}: that sweep has no finished λ = 0 run and control to reuse")
    # its timing describes the machine it trained on, not this sweep; a control reused before names where it trained
    kept = {k: v for k, v in control.items()
            if k not in ("speedup", "meets_target", "top1_gap_points", "train_s", "others_cores")}
    return {"row": {**kept, "reused_from": control.get("reused_from") or path.name}, "baseline_row": base,
            "linear_sites": data.get("linear_sites", {}).get(control["run"], [])}


def control_mismatch(control: dict, baseline_row: dict) -> str | None:
    """Why the loaded control is not the run this sweep would have trained (its λ = 0 run differs from ours to the
    hundredth, top-1 or top-5: e.g. another GPU model's numerics), or None when it is."""
    theirs, source = control["baseline_row"], control["row"]["reused_from"]
    if (theirs["top1_pct"], theirs["top5_pct"]) == (baseline_row["top1_pct"], baseline_row["top5_pct"]):
        return None
    return (f"--control-from {source}: its λ = 0 run ({theirs['top1_pct']} / {theirs['top5_pct']} % top-1 / top-5) "
            f"differs from this one's ({baseline_row['top1_pct']} / {baseline_row['top5_pct']} %), so its control "
            "is not this sweep's")


def reuse_control(control: dict) -> dict:
    """The loaded control as this sweep's run, once :func:`control_mismatch` found nothing."""
    log(f"[accuracy_sweep] {control['row']['run']}: reused from {control['row']['reused_from']} "
        f"({control['row']['top1_pct']} % top-1)")
    return {"row": dict(control["row"]), "linear_sites": control["linear_sites"]}


def merge_costs_for(args: argparse.Namespace, cell: str) -> dict[str, float]:
    """The merge-cost table of the Lite0 the runs train, measured on ``cell`` (``DEVICE:BATCH:SIZE``), or read from
    a JSON file (a sweep's ``merge_costs``, a saved config's, or the table itself)."""
    if cell.endswith(".json"):
        try:
            data = json.loads(Path(cell).read_text())
            return lf.LayerFoldingConfig(merge_costs=data.get("merge_costs", data)).merge_costs
        except (OSError, ValueError, AttributeError) as err:
            raise SystemExit(f"--merge-costs {cell!r}: not a readable merge-costs JSON ({err})") from None
    device, batch, size = _cell(cell, "--merge-costs")
    rounds, round_s = (2, 0.005) if args.quick else (7, 0.02 if device == "cuda" else 0.05)
    with _cudnn_benchmark(device):
        return lf.measure_merge_costs(_lite0(args), (3, size, size), batch_size=batch, device=device, rounds=rounds,
                                      round_seconds=round_s)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--out", default=str(RESULTS_DIR / "accuracy_sweep.json"))
    add("--lambdas", default="0.01,0.03,0.1",
        help="comma list of λ > 0, run in this order after λ = 0 ('' for none: only --plan runs)")
    add("--latency-rounds", type=int, default=50)
    add("--latency-budget-s", type=float, default=20.0, help="per latency cell")
    add("--latency-sizes", default="224,train", help="input sizes to time at ('train' = the training size)")
    add("--deadline-s", type=float, default=None, help="skip λ runs that would end after this many seconds")
    add("--start", default="pretrained", choices=["pretrained", "baseline"],
        help="λ > 0 runs start from the ImageNet weights, or from the λ = 0 run's fine-tuned model")
    add("--latency-weights", default=None, metavar="DEVICE:BATCH:SIZE",
        help="weigh the regularizer by the latency each fold saves, measured on this cell (e.g. cuda:128:224), "
             "or as stored in an earlier sweep's JSON")
    add("--latency-min-saving", type=float, default=0.0,
        help="with --latency-weights: groups saving at most this fraction of the baseline latency weigh 0")
    add("--merge-costs", default=None, metavar="DEVICE:BATCH:SIZE",
        help="split each run where measured latency says (LayerFoldingConfig.merge_costs), measured on this cell "
             "(e.g. cuda:128:224), or as stored in a JSON file")
    add("--plan", action="append", default=[], metavar="NAME=BLOCK,BLOCK,...",
        help="a run with this fixed plan (every site of these blocks linear, no search; a site's name takes that "
             "site alone), e.g. p1=bn1,blocks.0.0,blocks.1.0.bn1.act; repeatable")
    add("--teacher", default="baseline", choices=["baseline", "control"],
        help="with --distill-weight: distill from the λ = 0 model, or (with --start baseline) from the control")
    add("--baseline-cache", type=Path, default=None, metavar="FILE",
        help="reuse the λ = 0 run stored in FILE by an earlier sweep with the same settings, or store it there")
    add("--control-from", type=Path, default=None, metavar="JSON",
        help="take the control from this earlier sweep's JSON instead of training it (refused unless its settings "
             "match this sweep's; trained after all if its λ = 0 run does not match this one's); it is not timed")
    add("--control-first", action="store_true",
        help="train the control right after the λ = 0 run, not last: a --deadline-s then cuts a folding run "
             "rather than the control every folding run is judged against")
    add("--continue-steps", type=int, default=None,
        help="with --start baseline: training steps of the runs that start from the λ = 0 model (default: --steps)")
    add_run_args(parser)
    args = parser.parse_args(argv)
    apply_quick(args)
    try:  # before any training: a missing GPU failed only at the latency timing, after the whole sweep
        resolve_device(args.device, timing=True)
    except (RuntimeError, ValueError) as err:
        parser.error(str(err))
    if args.continue_steps is not None and (args.start != "baseline" or args.continue_steps <= args.search_steps):
        parser.error("--continue-steps needs --start baseline and more steps than --search-steps")
    plan_steps = args.continue_steps if args.start == "baseline" and args.continue_steps else args.steps
    if args.plan_ramp_steps and not (args.plan and 0 < args.plan_ramp_steps < plan_steps):
        parser.error(f"--plan-ramp-steps needs --plan and a value from 1 to below the plans' {plan_steps} steps")
    if args.teacher == "control" and (args.start != "baseline" or not args.distill_weight > 0):
        parser.error("--teacher control needs --start baseline (the control) and --distill-weight > 0")
    if args.control_from and args.teacher == "control":
        parser.error("--control-from reuses the control's row, not its weights: it cannot be --teacher control")
    if args.quick:
        args.latency_rounds, args.latency_budget_s, args.input_size = 5, 2.0, 32
    lambdas = [float(v) for v in str(args.lambdas).split(",") if v.strip() and float(v) > 0]
    plans = parse_plans(parser, args.plan)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_fashion_mnist(train_size=args.train_size or None, test_size=args.test_size or None, seed=args.seed)
    settings = {k: getattr(args, k) for k in (*RUN_SETTINGS, "start", "continue_steps", "folded_steps", "folded_lr",
                                                 "teacher")}
    result = {"benchmark": "accuracy_sweep", "title": "Accuracy against depth on Fashion-MNIST (EfficientNet-Lite0)",
              "description": ("λ sweep of LayerFoldingTrainer from the ImageNet-pretrained EfficientNet-Lite0; "
                              + (STARTED_FROM_BASELINE if args.start == "baseline"
                                 else DISTILLED_FROM_LAMBDA0 if args.distill_weight > 0 else "") +
                              "top-1 of the folded model on the test split (percent), gap to the λ = 0 run in "
                              "points, and latency speed-up of the folded model over the BN-fused λ = 0 model, "
                              "timed interleaved on the same device."),
              "device": device_info(args.device), "quick": args.quick, "settings": settings,
              "target": {"speedup": TARGET_SPEEDUP, "max_top1_loss_points": TARGET_LOSS_POINTS,
                         "cell": TARGET_CELL}, "rows": [], "skipped": []}
    if plans and not args.plan_ramp_steps:
        result["caveats"] = FIXED_PLAN_SHARING
    if args.merge_costs:  # before the gains: each group's fold follows the table
        args.merge_costs_table = merge_costs_for(args, args.merge_costs)
        result["merge_costs"] = args.merge_costs_table
        settings.update(merge_costs=args.merge_costs)
    if args.latency_weights:
        gains = measure_gains(args, args.latency_weights)
        args.regularizer_weights = gains.weights(args.latency_min_saving)
        result["fold_gains"] = {**gains.to_dict(), "weights": args.regularizer_weights}
        settings.update(latency_weights=args.latency_weights, latency_min_saving=args.latency_min_saving)
    reused = load_control(args.control_from, settings, args.device, args.quick) if args.control_from else None
    runs, folded, baseline_state = [], {}, None

    def record() -> None:
        """Every row's gaps to λ = 0 and to the control, then the JSON rewritten: a cut keeps what finished."""
        base = runs[0]["row"]
        control = next((r["row"] for r in runs if r["row"]["control"]), None)
        for r in runs:
            r["row"]["top1_gap_points"] = round(base["top1_pct"] - r["row"]["top1_pct"], 2)
            if control is not None and folds(r["row"]):
                r["row"]["top1_gap_vs_control_points"] = round(control["top1_pct"] - r["row"]["top1_pct"], 2)
                r["row"]["control_run"] = control["run"]
        result["rows"] = [r["row"] for r in runs]
        result["linear_sites"] = {r["row"]["run"]: r["linear_sites"] for r in runs}
        result["wall_s"] = round(time.perf_counter() - start, 1)
        write_json(args.out, result)

    step_s = None  # seconds per training step of the last run: a later run's length is estimated from its steps
    with tempfile.TemporaryDirectory(prefix="lf_sweep_") as scratch:
        folding = [(f"lambda={lam:g}", lam, None) for lam in lambdas]
        folding += [(f"plan={name}", 0.0, blocks) for name, blocks in plans.items()]
        control = ([(CONTROL, 0.0, None)] if args.start == "baseline"
                   else [(DISTILLED_CONTROL, 0.0, None)] if args.distill_weight > 0 else [])
        # the control runs last, so a --deadline-s that cuts the sweep short drops it rather than the folding runs
        # (the λ = 0 run still gives each a gap); first when the folding runs distill from it or --control-first
        # asks, and right after the λ = 0 run when a --control-from control turns out not to be reusable (below)
        first_control = args.teacher == "control" or args.control_first
        pending = [("lambda=0", 0.0, None)] + (control + folding if first_control else folding + control)
        while pending:
            label, lam, blocks = pending.pop(0)
            first = label == "lambda=0"  # the λ > 0 runs and the control build on this one
            run_args = args if first or args.continue_steps is None else copy.copy(args)
            if run_args is not args:
                run_args.steps = args.continue_steps
            elapsed = time.perf_counter() - start
            if label in (CONTROL, DISTILLED_CONTROL) and reused is not None:  # recorded with the λ = 0 run
                continue
            if args.deadline_s and step_s and elapsed + step_s * (run_args.steps + args.folded_steps) > args.deadline_s:
                result["skipped"].append(label)
                continue
            t0 = time.perf_counter()
            teacher_label = CONTROL if args.teacher == "control" and CONTROL in folded else "lambda=0"
            teacher = folded[teacher_label] if not first and args.distill_weight > 0 else None
            start_state = baseline_state if not first and args.start == "baseline" else None
            run = cached_baseline(args.baseline_cache, args) if first and args.baseline_cache else None
            if run is None:
                run = run_one(label, lam, data, run_args, scratch, teacher=teacher, start_state=start_state,
                              keep_state=first and (args.start == "baseline" or args.baseline_cache is not None),
                              plan_blocks=blocks)
                if first and args.baseline_cache:
                    save_baseline(args.baseline_cache, args, run)
            run["row"]["control"] = label in (CONTROL, DISTILLED_CONTROL)
            if blocks is not None:
                run["row"]["fixed_plan"] = blocks
            run["row"]["steps"] = run_args.steps
            if teacher is not None:
                run["row"]["teacher"] = teacher_label
            folded[label] = run.pop("folded")
            if args.folded_steps and not first:  # the folded network itself trains on (the control's too)
                folded[label], changed = finetune_folded(label, folded[label], data, args, scratch, teacher)
                run["row"].update(top1_before_folded_pct=run["row"]["top1_pct"], **changed)
            state = run.pop("state")
            baseline_state = state if first else baseline_state
            runs.append(run)
            if first and reused is not None:  # the λ = 0 run must match the reused control's, before more training
                why = control_mismatch(reused, run["row"])
                if why:  # not a user error known before training: the control trains here after all, and next,
                    # since it was asked for: a deadline then cuts a folding run, not every run's gap to the control
                    log(f"[accuracy_sweep] {why}; it trains here instead, before the folding runs")
                    result["control_not_reused"], reused = why, None
                    pending = control + [entry for entry in pending if entry not in control]
                else:  # costs no time: recorded at once, so a sweep cut short keeps its gaps
                    reused = reuse_control(reused)
                    runs.append(reused)
            step_s = (run["row"]["train_s"] / run_args.steps if "cached_from" in run["row"]
                      else (time.perf_counter() - t0) / (run_args.steps + (0 if first else args.folded_steps)))
            record()
    # the BN-fused baseline: the λ = 0 model folded under an empty plan (BatchNorm merged, nothing else)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # as in the latency suite: each conv shape gets its fastest kernel
        # device_info above recorded the training's setting; the table heading must not give it for the latency
        result["device"]["latency_cudnn_benchmark"] = True
    models = {"bn_fused": folded["lambda=0"], **{k: v for k, v in folded.items() if k != "lambda=0"}}
    result["latency"] = []
    for cell in latency_cells(args.device, args.input_size, args.latency_sizes):
        timed = time_against_baseline(models, args.device, cell, args.latency_rounds, args.latency_budget_s)
        key = cell_key(args.device, cell)
        result["latency"].append({"cell": key, **timed})
        for row in result["rows"]:
            name = "bn_fused" if row["run"] == "lambda=0" else row["run"]
            if name not in timed:  # a control reused with --control-from has no model here
                continue
            row.setdefault("speedup", {})[key] = timed[name]["speedup_vs_bn_fused"]
        mark_targets(result["rows"])  # after every cell: a time limit hit in a later cell keeps the verdict
        log(f"[accuracy_sweep] {key}: " + ", ".join(f"{k} {v['speedup_vs_bn_fused']}x" for k, v in timed.items()))
        result["wall_s"] = round(time.perf_counter() - start, 1)
        write_json(args.out, result)
    mark_targets(result["rows"])
    result["stats_note"] = f"non-linear layers / depth counted by lf.fold_stats at {args.input_size}px"
    write_json(args.out, result)
    log(f"[accuracy_sweep] done in {time.perf_counter() - start:.0f}s")
    return result


if __name__ == "__main__":
    main()
