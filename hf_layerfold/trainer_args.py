"""What ``LayerFoldingTrainer`` sets in, refuses of, or hides from the ``TrainingArguments`` it is given.

Kept apart from the trainer: each is a rule about one argument (sharding, activation checkpointing, DDP, batch
dispatch of a streaming set) and why Layer Folding needs it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import datasets
import torch.nn as nn
from transformers import TrainingArguments

logger = logging.getLogger("hf_layerfold.trainer")  # the trainer's messages, under the trainer's name

__all__ = ["adjust_args", "caller_values", "checkpointing_through_timm", "sharded_alpha_error", "timm_checkpointing",
           "warn_on_few_shards"]


def sharded_alpha_error(n_alphas: int, fsdp: bool, zero3: bool) -> str | None:
    """Why a model with α cannot train under parameter sharding, or ``None`` when nothing is sharded or it has no α.

    FSDP (1 and 2) refuses 0-dim parameters such as α outright, with advice (make α 1-D) that would not be enough:
    FSDP and DeepSpeed ZeRO-3 keep only each process's shard of a parameter between forward passes, and that is
    where the regularizer, the logs and the plan read α. Failing here names the way that works instead.
    """
    if n_alphas == 0 or not (fsdp or zero3):
        return None
    scheme = "FSDP" if fsdp else "DeepSpeed ZeRO-3"
    refuses = " (and FSDP refuses 0-dim parameters such as α)" if fsdp else ""
    return (f"LayerFoldingTrainer does not support {scheme} for a model with α parameters (this one has {n_alphas}): "
            f"{scheme} keeps only each process's shard of a parameter between forward passes, which is when the "
            f"α regularizer, the logs and the plan read α{refuses}. Launch with DDP instead (accelerate launch "
            "--multi_gpu): these CNNs fit on one device. See examples/README.md.")


_CHECKPOINTING = ("activation_checkpointing", "gradient_checkpointing")  # transformers 5.x name, then the old one


def checkpointing_through_timm(model: nn.Module, args: TrainingArguments) -> bool:
    """Whether ``activation_checkpointing=True`` (``gradient_checkpointing`` before transformers 5.x) must go through
    timm: Trainer calls transformers' ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable``, which
    timm models lack (``train()`` failed at its start); timm's ``set_grad_checkpointing`` recomputes each block in the
    backward instead. Raises when the model has neither."""
    names = [n for n in _CHECKPOINTING if hasattr(args, n)]
    if not any(getattr(args, n) for n in names) or any(hasattr(model, f"{n}_enable") for n in _CHECKPOINTING):
        return False
    if not hasattr(model, "set_grad_checkpointing"):
        raise ValueError(f"{names[0]}=True: {type(model).__name__} has neither transformers' {names[0]}_enable nor "
                         "timm's set_grad_checkpointing; turn it off")
    return True


@contextlib.contextmanager
def timm_checkpointing(model: nn.Module, args: TrainingArguments):
    """During ``train()``: timm's checkpointing on and the argument hidden from Trainer; both restored afterwards
    (the caller's ``TrainingArguments`` may serve another trainer, and the trained model recomputes no more)."""
    if not checkpointing_through_timm(model, args):
        yield {}
        return
    saved = {n: getattr(args, n) for n in (*_CHECKPOINTING, *(f"{n}_kwargs" for n in _CHECKPOINTING))
             if hasattr(args, n)}
    if any(v for n, v in saved.items() if n.endswith("_kwargs")):
        logger.warning("timm's set_grad_checkpointing checkpoints every block with its own settings: the "
                       "checkpointing kwargs are not used")
    was_on = bool(getattr(model, "grad_checkpointing", False))
    model.set_grad_checkpointing(True)
    for name in _CHECKPOINTING:
        if name in saved:
            setattr(args, name, False)
    try:
        yield saved
    finally:
        model.set_grad_checkpointing(was_on)
        for name, value in saved.items():
            setattr(args, name, value)


@contextlib.contextmanager
def caller_values(args: TrainingArguments, values: dict[str, Any]):
    """The caller's values of arguments ``train()`` hides from Trainer, put back while a checkpoint is written (its
    ``training_args.bin`` records the run as asked for), then hidden again."""
    hidden = {n: getattr(args, n) for n in values}
    for name, value in values.items():
        setattr(args, name, value)
    try:
        yield
    finally:
        for name, value in hidden.items():
            setattr(args, name, value)


def adjust_args(args: TrainingArguments, train_dataset: Any) -> None:
    """What Layer Folding needs of the arguments, set in place (each change a user asked otherwise is logged)."""
    if args.remove_unused_columns:
        # timm's forward(x) would make Trainer drop the image and label columns the collator needs.
        logger.info("LayerFoldingTrainer sets remove_unused_columns=False (the collator reads raw columns)")
        args.remove_unused_columns = False
    if getattr(args, "use_liger_kernel", False):
        # transformers patches only PreTrainedModel instances (and asks for liger-kernel first): nothing for timm
        logger.warning("LayerFoldingTrainer sets use_liger_kernel=False: Liger kernels patch transformers language "
                       "models, not timm CNNs")
        args.use_liger_kernel = False
    # The search → fine-tune switch freezes α mid-run: DDP must expect parameters without gradient,
    # else its reducer waits for α's gradient forever ("Expected to have finished reduction ...").
    if args.ddp_find_unused_parameters is False:
        logger.warning("LayerFoldingTrainer sets ddp_find_unused_parameters=True: α stops receiving "
                       "gradients when the plan is fixed")
    args.ddp_find_unused_parameters = True
    if args.ddp_static_graph:
        logger.warning("LayerFoldingTrainer sets ddp_static_graph=False: the graph changes when the plan is fixed")
        args.ddp_static_graph = False
    # A streaming training set: each process reads and decodes its own shards (accelerate splits a datasets
    # IterableDataset by shard when batches are not dispatched), instead of rank 0 decoding every image.
    accel = args.accelerator_config
    if isinstance(train_dataset, datasets.IterableDataset) and accel.dispatch_batches is None:
        accel.dispatch_batches = False
    if isinstance(train_dataset, datasets.IterableDataset) and accel.dispatch_batches is False:
        warn_on_few_shards(train_dataset, args.world_size)
    if isinstance(train_dataset, datasets.IterableDataset) and not _shuffled(train_dataset):
        logger.warning("the streaming training set is not shuffled: Trainer reads it in file order (a streaming "
                       "imagefolder: one class after another). Call train_dataset.shuffle(seed=..., buffer_size=...) "
                       "first (examples/fold_imagenet.py does).")


def _shuffled(dataset: datasets.IterableDataset) -> bool:
    """Whether ``dataset.shuffle`` was called on a streaming set (a shuffle buffer somewhere in its chain; for
    ``interleave_datasets`` / ``concatenate_datasets`` of streams, in each of them)."""

    def shuffled(node: Any, depth: int) -> bool:
        if node is None or depth > 64:
            return False
        if type(node).__name__ == "BufferShuffledExamplesIterable":
            return True
        sources = getattr(node, "ex_iterables", None)
        if sources:  # several streams: every one must be shuffled
            return all(shuffled(source, depth + 1) for source in sources)
        return shuffled(getattr(node, "ex_iterable", None), depth + 1)

    return shuffled(getattr(dataset, "_ex_iterable", None), 0)


def warn_on_few_shards(dataset: datasets.IterableDataset, world_size: int) -> bool:
    """Warn (and return True) when a streaming training set's shards do not divide among the processes: with fewer
    shards than processes accelerate cannot give each process its own, so every process reads and decodes the whole
    stream; with more, some processes get one shard more than others, and the others' examples are oversampled."""
    shards = getattr(dataset, "num_shards", None) or getattr(dataset, "n_shards", None)
    if world_size <= 1 or shards is None or shards % world_size == 0:
        return False
    if shards > world_size:  # accelerate gives each process a contiguous run of whole shards, some one more
        low = shards // world_size
        logger.warning("the streaming training set has %d shards for %d processes, not a multiple: %d process(es) "
                       "read %d shards and the others %d, so each process reaches the end of its stream at another "
                       "step and restarts it; the examples of the processes with fewer shards are trained on up to "
                       "%.2fx as often (with equally sized shards). Give it a multiple of %d shards.",
                       shards, world_size, shards % world_size, low + 1, low, (low + 1) / low, world_size)
        return True
    logger.warning("the streaming training set has %d shard(s) for %d processes: each process reads and decodes the "
                   "whole stream and keeps only its share of it. Give it at least %d shards (more data files, or "
                   "Dataset.to_iterable_dataset(num_shards=...)) so each process reads only its own.",
                   shards, world_size, world_size)
    return True
