"""Layer Folding of a timm CNN on ImageNet-1k with ``LayerFoldingTrainer`` (multi-GPU, streaming data).

    accelerate launch --multi_gpu --num_processes 8 examples/fold_imagenet.py \\
        --model_name mobilenetv2_100 --output_dir outputs/mobilenetv2_100-layerfold ...   # see examples/README.md

The training set streams from the Hub (``timm/imagenet-1k-wds``, webdataset shards: each rank reads its own
shards, nothing is downloaded up front). Every ``LayerFoldingConfig`` field (``--lambda_reg``, ``--search_epochs``,
``--distill_weight`` ...) and every ``TrainingArguments`` field is a flag. ``--init_from`` starts from a saved
search run (α learned): the plan is fixed from the threshold and training is the fine-tune phase only (the two-run
recipe in examples/README.md). A single ``.json`` argument holds the flags instead (HfArgumentParser's convention).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from transformers import HfArgumentParser, TrainingArguments

import hf_layerfold as lf
from hf_layerfold.cli_config import describe_config_actions
from hf_layerfold.config import LAYERFOLD_CONFIG_NAME
from hf_layerfold.data import detect_columns, load_image_dataset, num_labels_of
from hf_layerfold.hub import check_repo_id, check_save_target, is_folded_save
from hf_layerfold.phases import PhaseState
from hf_layerfold.timm_registry import WEIGHTS_NAME
from hf_layerfold.trainer import LayerFoldingTrainer

logger = logging.getLogger("fold_imagenet")


@dataclass
class ScriptArguments:
    model_name: str = field(default="mobilenetv2_100", metadata={"help": "timm model name"})
    pretrained: bool = field(default=True, metadata={"help": "start from timm's ImageNet weights (Hub)"})
    dataset_name: str = field(default="timm/imagenet-1k-wds", metadata={
        "help": "Hub dataset id, or a local folder in imagefolder layout"})
    streaming: bool = field(default=True, metadata={"help": "stream the dataset instead of downloading it"})
    train_split: str = field(default="train")
    eval_split: str = field(default="validation")
    shuffle_buffer: int = field(default=10_000, metadata={"help": "streaming shuffle buffer (examples)"})
    num_classes: int | None = field(default=None, metadata={
        "help": "classes of the head (default: the training set's ClassLabel count, else the model's own)"})
    num_train_examples: int | None = field(default=None, metadata={
        "help": "training-set size, to turn epochs into steps when streaming (default: the dataset card's)"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on the first N examples"})
    input_size: int | None = field(default=None, metadata={"help": "train/eval resolution (default: the model's)"})
    teacher_model_name: str | None = field(default=None, metadata={
        "help": "timm model (ImageNet weights) distilled from when --distill_weight > 0"})
    init_from: str | None = field(default=None, metadata={
        "help": "folder with model.safetensors of a search run: load it, fix the plan, fine-tune only"})
    plan: str | None = field(default=None, metadata={
        "help": "no search: these comma-separated blocks (every site inside) and single sites are linear from the "
                "first step, e.g. the published MobileNetV2-1.0 plan blocks.1.1,blocks.2.1,blocks.3.1,blocks.3.2,"
                "blocks.4.0"})
    folded_dir: str | None = field(default=None, metadata={"help": "where to save the folded model"})
    push_folded_to: str | None = field(default=None, metadata={"help": "Hub repo id for the folded model"})


TRAINING_DEFAULTS = dict(output_dir="outputs/fold_imagenet", per_device_train_batch_size=128,
                         per_device_eval_batch_size=256, learning_rate=5e-4, weight_decay=1e-5,
                         lr_scheduler_type="cosine", warmup_steps=500, label_smoothing_factor=0.1, num_train_epochs=3,
                         logging_steps=50, eval_strategy="steps", eval_steps=5000, save_strategy="steps",
                         save_steps=5000, save_total_limit=2, dataloader_num_workers=8, report_to="none")
FOLDING_DEFAULTS = dict(lambda_reg=0.25, regularizer="l1", alpha_lr=0.01, threshold=0.9, search_epochs=1.0)


def steps_per_epoch(script: ScriptArguments, args: TrainingArguments, train) -> int | None:
    """Optimizer steps per epoch of a streaming set, from its size (Trainer cannot count an IterableDataset)."""
    n = script.num_train_examples
    if n is None:
        splits = getattr(getattr(train, "info", None), "splits", None) or {}
        n = getattr(splits.get(script.train_split), "num_examples", None) or None
    if not n:
        return None
    per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    return math.ceil(n / per_step)


def head_size(script: ScriptArguments, train) -> dict:
    """``num_classes`` for timm: the flag, else the training set's class count (a local imagefolder of 10 classes
    trained a 1000-way head), else nothing (the model's own)."""
    if script.num_classes is not None:
        return {"num_classes": script.num_classes}
    try:
        classes = num_labels_of(train, detect_columns(train)[1])
    except ValueError:  # no recognizable label column: the trainer names what it found
        classes = None
    if classes is None:
        logger.warning("the training set names no classes (integer labels): the head keeps %s's own size; pass "
                       "--num_classes for another", script.model_name)
        return {}
    return {"num_classes": classes}


def check_same_sites(source: Path, config: lf.LayerFoldingConfig, planned: bool) -> None:
    """An ``--init_from`` run prepared the sites this run prepares, and while it was still searching, shared α the
    same way (a planned α is implied by its phase, so planned weights load either way)."""
    if not (source / LAYERFOLD_CONFIG_NAME).is_file():
        return
    saved = lf.LayerFoldingConfig.from_pretrained(source)
    fields = ("target_modules", "exclude_modules") + (() if planned else ("alpha_sharing",))
    differ = [f"{name}: {getattr(saved, name)!r} there, {getattr(config, name)!r} here"
              for name in fields if getattr(saved, name) != getattr(config, name)]
    if differ:
        raise ValueError(f"--init_from {source} was trained with other sites ({'; '.join(differ)}): give the same "
                         "flags, or start from lf.LayerFoldingConfig.from_pretrained of that folder")


def build_model(script: ScriptArguments, config: lf.LayerFoldingConfig, train) -> torch.nn.Module:
    model = timm.create_model(script.model_name, pretrained=script.pretrained and not script.init_from,
                              **head_size(script, train))
    if script.init_from:  # a prepared model's state dict: timm's keys plus each site's α and phase
        source = Path(script.init_from)
        if is_folded_save(source):
            raise ValueError(f"--init_from {source} is a folded save; give the run's output_dir (its planned or "
                             "searching model.safetensors), or fine-tune the folded model as it is")
        state = load_file(str(source / WEIGHTS_NAME))
        recorded = lf.FoldPlan.from_state_dict(state)  # a run that reached its fine-tune phase: its plan
        check_same_sites(source, config, planned=recorded is not None)
        lf.prepare_model(model, config)
        if recorded is not None:
            logger.warning("init_from %s: its plan was fixed when it ended (a search as long as its run ends "
                           "planned): that plan is reused and --threshold does not apply; to choose the plan "
                           "again, start from one of its checkpoints saved before the plan was fixed", source)
            lf.apply_plan(model, recorded, config)
            model.load_state_dict(state)
        else:  # a searching run's α: the plan is the sites past this run's threshold
            model.load_state_dict(state)
            lf.apply_plan(model, lf.FoldPlan.from_model(model, threshold=config.threshold), config)
        logger.info("init_from %s: plan fixed with %d linear sites", script.init_from, len(model.layerfold_plan))
    elif script.plan:  # α frozen from the first step: one per site, so a plan may take one site of a block
        lf.prepare_with_plan(model, [name.strip() for name in script.plan.split(",") if name.strip()], config)
        config.alpha_sharing = model.layerfold_config.alpha_sharing  # the trainer's config follows the model
        logger.info("--plan: %d linear sites, no search", len(model.layerfold_plan))
    return model


def searched(init_from: str | None) -> bool:
    """Whether the plan came from a search: an ``--init_from`` run of a fixed ``--plan`` searched nothing."""
    state = PhaseState.read(init_from) if init_from else None
    return state is None or state.search_steps != 0


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
    script, config, args = parse(argv)
    if script.init_from and script.plan:
        raise ValueError("--init_from and --plan both fix the plan: give one of them")
    # what the end of the run needs, checked before it starts: a bad folder or repo id would lose the training
    folded_dir = check_save_target(script.folded_dir or f"{args.output_dir}/folded", beside=[args.output_dir],
                                   replace_hint="remove it first")
    if script.push_folded_to:
        check_repo_id(script.push_folded_to, "--push_folded_to")
    logging.basicConfig(level=logging.INFO if args.should_log else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")

    train = load_image_dataset(script.dataset_name, split=script.train_split, streaming=script.streaming)
    evaluation = load_image_dataset(script.dataset_name, split=script.eval_split, streaming=script.streaming)
    if script.max_eval_samples:
        evaluation = (evaluation.take(script.max_eval_samples) if script.streaming
                      else evaluation.select(range(min(script.max_eval_samples, len(evaluation)))))
    if script.init_from or script.plan:  # the plan is fixed before the first step: no search to size
        config.search_steps = 0
    if script.streaming:
        train = train.shuffle(seed=args.seed, buffer_size=script.shuffle_buffer)
        per_epoch = steps_per_epoch(script, args, train)
        if args.max_steps <= 0:
            if per_epoch is None:
                raise ValueError("streaming needs --max_steps or --num_train_examples (dataset size unknown)")
            args.max_steps = math.ceil(args.num_train_epochs * per_epoch)
        if config.search_steps is None and config.search_epochs is not None:
            if per_epoch is None:
                raise ValueError("streaming: give --search_steps (or --num_train_examples for --search_epochs)")
            config.search_steps = round(config.search_epochs * per_epoch)
    model = build_model(script, config, train)
    teacher = None
    if config.distill_weight > 0:
        if not script.teacher_model_name:
            raise ValueError("--distill_weight > 0 needs --teacher_model_name")
        teacher = timm.create_model(script.teacher_model_name, pretrained=True)

    trainer = LayerFoldingTrainer(model, args, train_dataset=train, eval_dataset=evaluation,
                                  layerfold_config=config, teacher_model=teacher, input_size=script.input_size)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model()  # the planned model + layerfold_state.json (an --init_from source, and resumable)
    summary = {k: v for k, v in metrics.items() if k.startswith("eval_top")}
    if trainer.phase == "finetune":
        # the weights it started from: the card's base_model and, through it, their license (random weights: none)
        base_model = (model.pretrained_cfg or {}).get("hf_hub_id") if script.pretrained else None
        local_data = Path(script.dataset_name).expanduser().exists()  # a path is no Hub metadata
        summary["folded_dir"] = str(trainer.save_folded(
            folded_dir, push_to_hub=bool(script.push_folded_to), repo_id=script.push_folded_to,
            datasets=None if local_data else script.dataset_name, base_model=base_model,
            plan_searched=not script.plan and searched(script.init_from),
            **({} if script.pretrained else {"license": False})))
    else:  # a search-only run (two-run recipe, step 1): the next run starts from it with --init_from
        summary["search_run"] = args.output_dir
    if trainer.is_world_process_zero():
        print(json.dumps(summary, indent=2))
    # destroy the process group before interpreter shutdown (see fold_fashion_mnist.py)
    getattr(trainer, "end", trainer.accelerator.end_training)()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
