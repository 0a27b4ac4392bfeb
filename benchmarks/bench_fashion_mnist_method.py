"""Method check on Fashion-MNIST: Layer Folding (λ > 0) beside the same fine-tune without the regularizer (λ = 0).

Both runs start from the real ImageNet-pretrained EfficientNet-Lite0 (``load_efficientnet_lite0_imagenet``, a new
10-class head), see the same data, steps and seeds, and use ``LayerFoldingTrainer`` end to end: α search for the
first ``search_steps``, plan fixed from the threshold, fine-tune for the rest. Reported per run: top-1 / top-5 of
the *folded* model on the test subset (checked to match the planned model), sites past the threshold, the
projected and the actual non-linear layers / depth after folding, and the α trajectory from the trainer's logs.

``python -m benchmarks.bench_fashion_mnist_method --out benchmarks/results/fashion_mnist_method.json``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import timm.data
import torch
from transformers import TrainerCallback, TrainingArguments

import hf_layerfold as lf
from hf_layerfold.data import ImageClassificationCollator, load_fashion_mnist
from hf_layerfold.plan import applied_plan, check_plan
from hf_layerfold.pretrained import load_efficientnet_lite0_imagenet
from hf_layerfold.trainer import LayerFoldingTrainer

from .harness import RESULTS_DIR, LoadMeter, device_info, log, write_json


def transforms(model: torch.nn.Module, size: int) -> tuple:
    """Light augmentation (crops of 60-100 % of the image, flips): ImageNet-strength crops and colour jitter do
    not converge in a few hundred steps on 28x28 grey images."""
    cfg = timm.data.resolve_model_data_config(model)
    cfg["input_size"] = (3, size, size)
    train = timm.data.create_transform(**cfg, is_training=True, scale=(0.6, 1.0), color_jitter=0.0)
    return train, timm.data.create_transform(**cfg, is_training=False)


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset, collator, batch_size: int = 100) -> tuple[float, float, list]:
    """Top-1 / top-5 (percent) of ``model`` on ``dataset``, and its logits of the first batch."""
    model.eval()
    device = next(model.parameters()).device
    hit1 = hit5 = 0
    first = None
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = model(batch["pixel_values"].to(device)).float().cpu()
        first = logits if first is None else first
        top5 = logits.topk(5, dim=-1).indices
        hit1 += int((top5[:, 0] == batch["labels"]).sum())
        hit5 += int((top5 == batch["labels"][:, None]).any(1).sum())
    return 100.0 * hit1 / len(dataset), 100.0 * hit5 / len(dataset), first


def training_args(args: argparse.Namespace, output_dir: str, steps: int, lr: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=100, learning_rate=lr, weight_decay=args.weight_decay,
        lr_scheduler_type="cosine", label_smoothing_factor=0.1, logging_steps=args.logging_steps,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=args.seed, use_cpu=args.device == "cpu",
        bf16=args.bf16, dataloader_num_workers=args.workers)


def finetune_folded(label: str, net: torch.nn.Module, data, args: argparse.Namespace, scratch: str,
                    teacher: torch.nn.Module | None = None) -> tuple[torch.nn.Module, dict]:
    """Train the folded network itself (``LayerFoldingTrainer``'s ``"folded"`` phase) for ``--folded-steps`` at
    ``--folded-lr``, distilling from ``teacher`` when given; returns it and its new top-1 / top-5 and training
    time (the caller keeps the accuracy it had before: ``run_one`` measured it)."""
    torch.manual_seed(args.seed)
    train_tf, eval_tf = transforms(net, args.input_size)
    eval_collator = ImageClassificationCollator(eval_tf)
    config = lf.LayerFoldingConfig(distill_weight=args.distill_weight if teacher is not None else 0.0,
                                   distill_temperature=args.distill_temperature)
    trainer = LayerFoldingTrainer(net, training_args(args, f"{scratch}/{label}-folded", args.folded_steps,
                                                     args.folded_lr),
                                  train_dataset=data["train"], data_collator=ImageClassificationCollator(train_tf),
                                  layerfold_config=config, teacher_model=teacher)
    log(f"[fashion_mnist_method] {label}: training the folded network {args.folded_steps} steps")
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    device = "cuda" if args.device == "cuda" else "cpu"
    net = trainer.model.eval()
    top1, top5, _ = accuracy(net.to(device), data["test"], eval_collator)
    return net.cpu(), {"top1_pct": round(top1, 2), "top5_pct": round(top5, 2), "folded_steps": args.folded_steps,
                       "folded_train_s": round(train_s, 1)}


class AlphaRamp(TrainerCallback):
    """α of the plan's sites rises linearly to 1 over the first ``steps`` steps (1/steps at the first), every other
    site's stays 0: the fixed plan eased in instead of switched on at the first step (sweep flag
    ``--plan-ramp-steps``). Set before each step, so the optimizer's update of α in between never reaches a forward."""

    def __init__(self, linear_sites, steps: int) -> None:
        self.linear_sites, self.steps = set(linear_sites), steps

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        value = min(1.0, (state.global_step + 1) / self.steps)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, lf.FoldableActivation) and m.fixed is None:
                    m.alpha.fill_(value if m.site in self.linear_sites else 0.0)


def run_one(label: str, lambda_reg: float, data, args: argparse.Namespace, scratch: str,
            teacher: torch.nn.Module | None = None, start_state: dict | None = None, keep_state: bool = False,
            plan_blocks: list[str] | None = None) -> dict:
    """One LayerFoldingTrainer run; with a ``teacher`` (and ``--distill-weight``) it also distills from it. The
    model starts from the ImageNet-pretrained Lite0, or from ``start_state`` (the ``"state"`` of a run made with
    ``keep_state``). With ``plan_blocks`` there is no search: every site in those blocks (or the site of that name)
    is linear from the first step (``FoldPlan.from_blocks``) and the whole run fine-tunes that fixed plan."""
    torch.manual_seed(args.seed)
    model = load_efficientnet_lite0_imagenet(num_classes=10)
    if start_state is not None:
        model.load_state_dict(start_state)
    original = lf.fold_stats(model, args.input_size)
    train_tf, eval_tf = transforms(model, args.input_size)
    config = run_config(args, lambda_reg, distill=teacher is not None)
    ramp = getattr(args, "plan_ramp_steps", 0) if plan_blocks is not None else 0
    callbacks = []
    if plan_blocks is not None and not ramp:  # one α per site, frozen from the first step
        model = lf.prepare_with_plan(model, plan_blocks, config)
        config = model.layerfold_config
    elif plan_blocks is not None:  # a "search" whose α the schedule sets; the trainer fixes the plan at step `ramp`
        model = lf.prepare_model(model, config)
        wanted = lf.FoldPlan.from_blocks(model, plan_blocks)
        check_plan(model, wanted)  # what apply_plan would refuse (part of a shared α group), before training
        config = replace(config, search_steps=ramp, lambda_reg=0.0)
        callbacks.append(AlphaRamp(wanted.linear_sites, ramp))
    targs = training_args(args, f"{scratch}/{label}", args.steps, args.lr)
    eval_collator = ImageClassificationCollator(eval_tf)
    trainer = LayerFoldingTrainer(model, targs, train_dataset=data["train"], eval_dataset=data["test"],
                                  data_collator=ImageClassificationCollator(train_tf),
                                  eval_data_collator=eval_collator, layerfold_config=config,
                                  input_size=args.input_size, teacher_model=teacher, callbacks=callbacks)
    search = f"search {config.search_steps}" if plan_blocks is None else (
        f"fixed plan, α ramped to 1 over {ramp} steps" if ramp else "fixed plan")
    log(f"[fashion_mnist_method] {label}: training {args.steps} steps ({search})")
    start = time.perf_counter()
    with LoadMeter() as meter:
        trainer.train()
    train_s = time.perf_counter() - start
    metrics = trainer.evaluate()
    planned = trainer.model.eval().cpu()
    plan = applied_plan(planned)
    if ramp and set(plan.linear_sites) != set(wanted.linear_sites):
        raise RuntimeError(f"{label}: the ramp fixed {sorted(plan.linear_sites)}, not the plan's sites")
    folded = lf.fold_model(planned)
    batch = eval_collator([data["test"][i] for i in range(100)])
    with torch.no_grad():
        fold_err = float((planned(batch["pixel_values"]) - folded(batch["pixel_values"])).abs().max())
    device = "cuda" if args.device == "cuda" else "cpu"
    top1, top5, _ = accuracy(folded.to(device), data["test"], eval_collator)
    folded.cpu()
    after = lf.fold_stats(folded, args.input_size)
    projected = lf.projected_stats(planned)
    trajectory = [{k: e[k] for k in ("step", "loss", "task_loss", "reg_loss", "alpha_mean", "sites_past_threshold",
                                     "projected_nonlinear_layers", "projected_depth", "phase")}
                  for e in trainer.state.log_history if "task_loss" in e]
    row = {"run": label, "lambda_reg": lambda_reg, "top1_pct": round(top1, 2), "top5_pct": round(top5, 2),
           "trainer_eval_top1_pct": round(100 * metrics["eval_top1"], 2), "sites": len(lf.alpha_parameters(planned)),
           "sites_past_threshold": len(plan), "projected_nonlinear_layers": projected.nonlinear_layers,
           "projected_depth": projected.depth, "nonlinear_layers_before": original.nonlinear_layers,
           "nonlinear_layers_after": after.nonlinear_layers, "depth_before": original.depth, "depth_after": after.depth,
           "mmacs_before": round(original.macs / 1e6, 2), "mmacs_after": round(after.macs / 1e6, 2),
           "folded_vs_planned_max_abs_diff": fold_err, "train_s": round(train_s, 1),
           "others_cores": meter.result.get("other_processes_cores")}
    log(f"[fashion_mnist_method] {row}")
    state = None
    if keep_state:  # the trained timm weights, without α; only meaningful when no site became linear
        if len(plan):
            raise ValueError(f"{label}: a run with linear sites cannot start another as a plain timm model (α still "
                             f"learns at λ = 0: the task loss alone took {len(plan)} site(s) past the threshold, "
                             f"{list(plan.linear_sites)}; try another --seed or a higher --threshold)")
        site_keys = {f"{site}.{key}" for site in lf.alpha_parameters(planned) for key in ("alpha", "_extra_state")}
        state = {k: v.detach().clone() for k, v in planned.state_dict().items() if k not in site_keys}
    return {"row": row, "trajectory": trajectory, "linear_sites": list(plan.linear_sites), "folded": folded,
            "state": state}


def run_config(args: argparse.Namespace, lambda_reg: float = 0.0, distill: bool = False) -> lf.LayerFoldingConfig:
    """The LayerFoldingConfig a run trains (and its model folds) with, from the run settings."""
    return lf.LayerFoldingConfig(alpha_init=args.alpha_init, lambda_reg=lambda_reg, regularizer=args.regularizer,
                                 threshold=args.threshold, alpha_lr=args.alpha_lr, search_steps=args.search_steps,
                                 max_macs_increase=args.max_macs_increase, alpha_sharing=args.alpha_sharing,
                                 distill_weight=args.distill_weight if distill else 0.0,
                                 distill_temperature=args.distill_temperature,
                                 regularizer_weights=getattr(args, "regularizer_weights", None),
                                 merge_costs=getattr(args, "merge_costs_table", None))


RUN_SETTINGS = ("train_size", "test_size", "input_size", "steps", "search_steps", "batch_size", "lr", "weight_decay",
                "regularizer", "alpha_init", "alpha_lr", "threshold", "alpha_sharing", "max_macs_increase",
                "distill_weight", "distill_temperature", "threads", "bf16", "seed", "plan_ramp_steps")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The flags of one ``run_one`` training run (shared with ``bench_accuracy_sweep``)."""
    add = parser.add_argument
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--quick", action="store_true", help="a few steps on a tiny subset (smoke test, numbers meaningless)")
    add("--train-size", type=int, default=4000, help="0 = all 60k")
    add("--test-size", type=int, default=2000, help="0 = all 10k")
    add("--input-size", type=int, default=64)
    add("--steps", type=int, default=400)
    add("--search-steps", type=int, default=200)
    add("--batch-size", type=int, default=32)
    add("--lr", type=float, default=1e-3)
    add("--weight-decay", type=float, default=0.01)
    add("--regularizer", default="l1")
    add("--alpha-init", type=float, default=0.0)
    add("--alpha-lr", type=float, default=0.05)
    add("--threshold", type=float, default=0.9)
    add("--max-macs-increase", type=float, default=None)
    add("--alpha-sharing", default="site", choices=["site", "block"], help="one α per site or per block")
    add("--distill-weight", type=float, default=0.0,
        help="λ > 0 runs distill from the λ = 0 run's model with this weight (sweep only; 0: off)")
    add("--distill-temperature", type=float, default=2.0)
    add("--logging-steps", type=int, default=25)
    add("--threads", type=int, default=1, help="torch threads on CPU (1 is fastest on a busy 2-core machine)")
    add("--bf16", action="store_true", help="train under bf16 autocast (GPU)")
    add("--workers", type=int, default=0, help="dataloader workers")
    add("--seed", type=int, default=0)
    add("--folded-steps", type=int, default=0,
        help="sweep only: then train each folded network itself this many steps (0: off)")
    add("--plan-ramp-steps", type=int, default=0,
        help="sweep only: fixed plans ease their sites in, α rising from 0 to 1 over this many steps (0: at once)")
    add("--folded-lr", type=float, default=3e-4,
        help="learning rate of --folded-steps (no BatchNorm is left: 1e-3 diverged on this proxy)")


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.train_size, args.test_size, args.steps, args.search_steps, args.logging_steps = 256, 200, 8, 4, 2


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "fashion_mnist_method.json"))
    parser.add_argument("--lambda-reg", default="0.01",
                        help="comma list: one Layer Folding run per λ, plus the λ = 0 run")
    add_run_args(parser)
    args = parser.parse_args(argv)
    apply_quick(args)
    lambdas = [float(v) for v in str(args.lambda_reg).split(",") if float(v) > 0]
    torch.set_num_threads(args.threads)
    data = load_fashion_mnist(train_size=args.train_size or None, test_size=args.test_size or None, seed=args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lf_method_") as scratch:
        runs = [run_one(f"lambda={lam:g}", lam, data, args, scratch) for lam in lambdas]
        runs.append(run_one("lambda=0", 0.0, data, args, scratch))
    plain = runs[-1]["row"]
    for run in runs[:-1]:  # accuracy cost of folding, in points, against the same fine-tune without λ
        run["row"]["top1_gap_points"] = round(plain["top1_pct"] - run["row"]["top1_pct"], 2)
        run["row"]["within_one_point"] = abs(run["row"]["top1_gap_points"]) <= 1.0
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    data_out = {
        "benchmark": "fashion_mnist_method", "title": "Layer Folding on Fashion-MNIST (EfficientNet-Lite0, ImageNet)",
        "description": ("ImageNet-pretrained EfficientNet-Lite0 fine-tuned on a Fashion-MNIST subset with "
                        "LayerFoldingTrainer: λ > 0 vs the same run with λ = 0. Accuracies are of the folded models "
                        "on the test subset, in percent."),
        "device": device_info(args.device), "quick": args.quick, "settings": settings,
        "rows": [r["row"] for r in runs],
        "wall_s": round(time.perf_counter() - start, 1),
        "trajectories": {r["row"]["run"]: r["trajectory"] for r in runs},
        "linear_sites": {r["row"]["run"]: r["linear_sites"] for r in runs},
    }
    write_json(args.out, data_out)
    return data_out


if __name__ == "__main__":
    main()
