"""Layer-fold an ImageNet-pretrained EfficientNet-Lite0 while fine-tuning it on Fashion-MNIST, on a CPU.

Run it with ``make demo`` (or ``python examples/demo.py --help``). The defaults are sized to finish well within
15 minutes on 2 CPU cores (2.1 min on a 2-core AMD EPYC, ``benchmarks/results/demo_cpu.json``); the flags lift every
bound (subset sizes, resolution, epochs, ...).
``DEMO_JSON=FILE`` writes what it measured, with its flags and environment, to FILE.

What happens:

1. **baseline**: the pretrained EfficientNet-Lite0 (bundled ImageNet weights, new 10-class head) is fine-tuned on a
   Fashion-MNIST subset with the demo's recipe and *no* folding (``search_steps=0``: the plan is fixed empty
   before the first step, so every activation stays as it is).
2. **layer folding**: the same pretrained model, data, steps and learning rate. The first quarter of training
   (``--search-epochs``) learns one α per activation under the λ regularizer, then the plan (sites with
   α ≥ threshold) is fixed and the rest fine-tunes the network that will be folded, distilling from the
   baseline of step 1 (``--distill-weight``).
3. both are converted for deployment: the baseline gets its BatchNorm fused into the convs (free, no accuracy
   change), the layer-folded model is folded exactly into fewer convs. Both are evaluated on the same test subset
   and timed on this machine at batch 1 and 32 (interleaved rounds, median).
4. the folded model and its model card are written to ``--output-dir`` (atomically), reloaded with
   ``timm.create_model("local-dir:...", pretrained=True)`` and checked to give exactly the same outputs.

In the printed table, **before** is the baseline of step 1 (BN fused) and **after** is the layer-folded model:
same starting weights, same data, same number of steps, so the accuracy difference is what folding cost.
With ``--no-baseline`` the baseline run is skipped (about half the time, no distillation): the before column then
shows the original architecture's structure and latency, and no before accuracy.

Why these defaults: the ``l1`` regularizer pushes every α with a constant force (the paper's Σ|1−α²| has no gradient
at α = 0, so nothing moves in a short run). ``max_macs_increase=0`` keeps folding from merging a 1x1 expansion and a
depthwise conv into one large dense conv: that merge removes depth but multiplies MACs, which a CPU pays for. With
both, λ = 0.1 (the default) removed 21 of 32 activations: top-1 84.2% → 83.3%, MACs 31.35 → 30.10 M, depth
49 → 43, 1.08x faster at batch 1 and 1.07x at batch 32 on a 2-core AMD EPYC (1 thread, 3000 training images,
64 px, 2 epochs; ``benchmarks/results/demo_cpu.json``; a top-1 on 1000 test images has a binomial standard error of
about 1.2 points). Deep merging is for hardware where depth, not MACs, bounds latency: on an H100 it gave
1.05x-3.76x at batch 128, 224 px, depending on λ (``benchmarks/results/accuracy_sweep_cuda.json``);
``hf-layerfold benchmark --device cuda`` measures a saved model there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch

import hf_layerfold  # noqa: F401  (registers the layerfold_net architecture with timm)
from hf_layerfold import LayerFoldingConfig, fold_model, fold_stats
from hf_layerfold.data import ImageClassificationCollator, load_fashion_mnist
from hf_layerfold.hub import check_save_target
from hf_layerfold.phases import SEARCH
from hf_layerfold.pretrained import load_efficientnet_lite0_imagenet
from hf_layerfold.timing import cpu_model_name, measure_latency
from hf_layerfold.trainer import LayerFoldingTrainer
from hf_layerfold.workflow import evaluate_model, fmt_count, format_table, set_input_size, training_arguments

DATASET_ID = "zalando-datasets/fashion_mnist"
DEFAULT_OUTPUT = "outputs/lite0-fashion-mnist-folded"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--train-size", type=int, default=3000, help="Fashion-MNIST training images (stratified subset; 60000 = all)")
    add("--test-size", type=int, default=1000, help="Fashion-MNIST test images (stratified subset; 10000 = all)")
    add("--image-size", type=int, default=64, help="resolution the 28x28 images are upsampled to")
    add("--epochs", type=float, default=2.0, help="epochs of each run (search + fine-tune together)")
    add("--max-steps", type=int, default=None, help="optimizer steps of each run (overrides --epochs)")
    add("--batch-size", type=int, default=32, help="batch size")
    add("--lr", type=float, default=1e-3, help="learning rate of the weights")
    add("--lambda-reg", type=float, default=0.1, help="weight λ of the α regularizer")
    add("--search-epochs", type=float, default=None,
        help="epochs of the α search; the rest of the run fine-tunes with the plan fixed (default: 0.5, or half of "
             "--max-steps when that is given)")
    add("--regularizer", default="l1", help="'l1' = Σ(1−α) or 'paper' = Σ|1−α²| (its gradient is 0 at α=0)")
    add("--alpha-lr", type=float, default=0.05, help="learning rate of α")
    add("--threshold", type=float, default=0.9, help="α at which a site becomes linear")
    add("--max-macs-increase", type=float, default=0.0,
        help="split merged runs so no merged conv costs more than (1 + x) times the convs it replaces "
             "(0: folding never adds compute, the right choice for a CPU); -1: merge every run as far as possible")
    add("--distill-weight", type=float, default=0.5,
        help="weight of distillation from the baseline (the teacher) in the folding run; 0 or --no-baseline: off")
    add("--no-baseline", dest="baseline", action="store_false",
        help="skip the baseline fine-tune (no 'before' accuracy; about half the time)")
    add("--output-dir", default=DEFAULT_OUTPUT, help="where the folded model and its card are saved")
    add("--seed", type=int, default=0, help="seed of subsets, weights init and data order")
    add("--threads", type=int, default=1,
        help="torch compute threads (0 = torch's choice). On the shared machine this demo was timed on, a run took "
             "1.9-5.6 min with 1 thread and 34 min with 2: OpenMP threads stall when other processes hold the "
             "cores. On an idle machine 2 threads may be somewhat faster")
    add("--latency-rounds", type=int, default=7, help="interleaved timing rounds (the median is reported)")
    add("--large-batch", type=int, default=32, help="also time this batch size (0: batch 1 only)")
    add("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def train_transform(model: torch.nn.Module, image_size: int):
    """Light augmentation: a short fine-tune on a small subset converges badly under ImageNet-strength crops."""
    cfg = timm.data.resolve_model_data_config(model)
    cfg["input_size"] = (3, image_size, image_size)
    return timm.data.create_transform(**cfg, is_training=True, scale=(0.6, 1.0), color_jitter=0.0)


def eval_transform(model: torch.nn.Module, image_size: int):
    cfg = timm.data.resolve_model_data_config(model)
    cfg["input_size"] = (3, image_size, image_size)
    return timm.data.create_transform(**cfg, is_training=False)


def run_training(config: LayerFoldingConfig, data: Any, args: argparse.Namespace, scratch: Path,
                 name: str, teacher: torch.nn.Module | None = None) -> LayerFoldingTrainer:
    """One fine-tune of the pretrained EfficientNet-Lite0 with the demo's recipe; returns the trained trainer."""
    torch.manual_seed(args.seed)
    model = load_efficientnet_lite0_imagenet(num_classes=10)
    set_input_size(model, args.image_size)
    targs = training_arguments(
        str(scratch / name), epochs=args.epochs, max_steps=args.max_steps or -1, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, logging_steps=max(1, min(20, (args.max_steps or 10**9) // 4)),
        device="cpu", progress=not args.quiet)
    trainer = LayerFoldingTrainer(
        model=model, args=targs, train_dataset=data["train"], eval_dataset=data["test"], layerfold_config=config,
        teacher_model=teacher,
        data_collator=ImageClassificationCollator(train_transform(model, args.image_size)),
        eval_data_collator=ImageClassificationCollator(eval_transform(model, args.image_size)),
        input_size=args.image_size)
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns what it measured (the table's numbers, paths, diffs, wall time)."""
    args = parse_args(argv)
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous)


def environment() -> dict:
    """What the demo's figures depend on besides its flags (``DEMO_JSON`` records it beside them)."""
    import transformers

    return {"cpu": cpu_model_name(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__, "hf_layerfold": hf_layerfold.__version__}


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    try:  # what the save at the end would refuse, refused before the training
        output = check_save_target(args.output_dir, replace_hint="remove it first")
    except (FileExistsError, NotADirectoryError) as err:
        raise SystemExit(f"demo.py: error: {err}; pick another --output-dir") from None

    data = load_fashion_mnist(train_size=args.train_size, test_size=args.test_size, seed=args.seed)
    print(f"Fashion-MNIST: {len(data['train'])} train / {len(data['test'])} test images at "
          f"{args.image_size}x{args.image_size}; torch threads: {torch.get_num_threads()}")
    distill = args.distill_weight if args.baseline else 0.0
    fold_config = LayerFoldingConfig(lambda_reg=args.lambda_reg, regularizer=args.regularizer,
                                     alpha_lr=args.alpha_lr, threshold=args.threshold, distill_weight=distill,
                                     max_macs_increase=None if args.max_macs_increase < 0 else args.max_macs_increase,
                                     distill_temperature=2.0,
                                     search_epochs=(0.5 if args.search_epochs is None and not args.max_steps
                                                    else args.search_epochs))
    input_size = (3, args.image_size, args.image_size)
    eval_kw = dict(image_size=args.image_size, batch_size=128, progress=not args.quiet)

    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.train-", dir=output.parent))
    try:
        baseline = baseline_acc = None
        if args.baseline:
            print("\n[1/3] baseline: fine-tune without folding")
            trainer = run_training(LayerFoldingConfig(search_steps=0), data, args, scratch, "baseline")
            baseline = fold_model(trainer.model)  # empty plan: BatchNorm fused, nothing else changes
            baseline_acc = evaluate_model(baseline, data["test"], **eval_kw)
        print(f"\n[{2 if args.baseline else 1}/3] layer folding: α search, then fine-tune with the plan fixed")
        teacher = baseline if distill > 0 else None  # the fine-tuned, unfolded network guides the folded one
        trainer = run_training(fold_config, data, args, scratch, "layerfold", teacher)
        planned = trainer.model.eval()
        folded = fold_model(planned)
        folded_acc = evaluate_model(folded, data["test"], **eval_kw)
        if baseline is None:  # structure and latency of the original architecture (weights do not matter)
            reference = load_efficientnet_lite0_imagenet(num_classes=10)
            set_input_size(reference, args.image_size)
            baseline = fold_model(reference)

        print(f"\n[3/3] measuring, saving to {output}, reloading")
        stats_before, stats_after = fold_stats(baseline, input_size), fold_stats(folded, input_size)
        pair = {"before": baseline, "after": folded}
        latency = measure_latency(pair, input_size, batch_size=1, rounds=args.latency_rounds)
        large = measure_latency(pair, input_size, batch_size=args.large_batch,
                                rounds=args.latency_rounds) if args.large_batch > 1 else None
        x = torch.stack([eval_transform(folded, args.image_size)(data["test"][i]["image"].convert("RGB"))
                         for i in range(min(16, len(data["test"])))])
        with torch.no_grad():
            fold_err = float((planned(x) - folded(x)).abs().max())
        accuracy = {"after": folded_acc["top1"], "split": "test", "dataset": DATASET_ID}
        if baseline_acc is not None:
            accuracy["before"] = baseline_acc["top1"]
        threads = torch.get_num_threads()
        cpu = f"CPU ({threads} thread{'s' if threads > 1 else ''})"
        path = trainer.save_folded(
            output, base_model=None, datasets=DATASET_ID, stats_before=stats_before, accuracy=accuracy,
            model_name="EfficientNet-Lite0, layer-folded on Fashion-MNIST", plan_searched=True,
            latency={"before_ms": latency["before"], "after_ms": latency["after"], "batch_size": 1,
                     "dtype": "fp32", "device": cpu, "input_size": list(input_size)},
            eval_results={"dataset": DATASET_ID, "split": "test",
                          "dataset_name": f"Fashion-MNIST (test, {folded_acc['images']}-image subset)",
                          "metrics": {"top1": folded_acc["top1"], "top5": folded_acc["top5"]}})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    reloaded = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    with torch.no_grad():
        ref, out = folded(x), reloaded(x)
    reload_diff = float((ref - out).abs().max())
    if not torch.equal(ref, out):
        raise SystemExit(f"demo.py: error: the reloaded model differs from the folded one (max |diff| {reload_diff})")

    def acc(result: dict | None) -> str:
        return f"{result['top1']:.2%}" if result else "not run (--no-baseline)"

    before_label = "before: fine-tuned, no folding (BN fused)" if args.baseline else "before: original architecture"
    rows = [
        [f"top-1, Fashion-MNIST test ({folded_acc['images']} images)", acc(baseline_acc), acc(folded_acc)],
        ["non-linear layers", stats_before.nonlinear_layers, stats_after.nonlinear_layers],
        ["depth (convs on the longest path)", stats_before.depth, stats_after.depth],
        ["params", fmt_count(stats_before.params), fmt_count(stats_after.params)],
        [f"MACs / image at {args.image_size}px", fmt_count(stats_before.macs), fmt_count(stats_after.macs)],
        [f"{cpu} latency, batch 1", f"{latency['before']:.2f} ms", f"{latency['after']:.2f} ms"],
    ]
    if large is not None:
        rows.append([f"{cpu} latency, batch {args.large_batch}", f"{large['before']:.2f} ms",
                     f"{large['after']:.2f} ms"])
    print()
    print(format_table(["EfficientNet-Lite0 on Fashion-MNIST", before_label, "after: layer-folded"], rows))
    print(f"\nplan: {len(folded.layerfold_plan)} of {len(hf_layerfold.alpha_parameters(planned))} activations "
          f"removed; latency speed-up {latency['before'] / latency['after']:.2f}x at batch 1"
          + (f", {large['before'] / large['after']:.2f}x at batch {args.large_batch}" if large else ""))
    if trainer.phase == SEARCH:  # the search was longer than the run: the plan was never fixed and fine-tuned
        print(f"training ended in the search phase (--search-epochs longer than the run): the folded model is the "
              f"threshold plan of a model trained with soft α, max |diff| {fold_err:.2e} from it; lengthen the run "
              "or shorten --search-epochs")
    else:
        print(f"folded vs. planned (trained) model: max |diff| {fold_err:.2e} (float rounding of the exact fold)")
    print(f"reloaded via timm.create_model('local-dir:{path}'): max |diff| {reload_diff:.1e} (identical)")
    print(f"saved: {', '.join(sorted(p.name for p in Path(path).iterdir()))}")
    wall = time.perf_counter() - start
    print(f"demo wall time: {wall / 60:.1f} min")
    return {"path": str(path), "before": {"accuracy": baseline_acc, **stats_before.to_dict(),
                                          "latency_ms": latency["before"],
                                          "large_batch_latency_ms": large and large["before"]},
            "after": {"accuracy": folded_acc, **stats_after.to_dict(), "latency_ms": latency["after"],
                      "large_batch_latency_ms": large and large["after"]},
            "linear_sites": list(folded.layerfold_plan.linear_sites), "fold_max_abs_diff": fold_err,
            "reload_max_abs_diff": reload_diff, "wall_time_s": wall, "settings": dict(vars(args)),
            "environment": environment()}


if __name__ == "__main__":
    result = main()
    if os.environ.get("DEMO_JSON"):
        Path(os.environ["DEMO_JSON"]).write_text(json.dumps(result, indent=2, default=str))
    sys.exit(0)
