"""The data side of ``LayerFoldingTrainer``: which collator reads which set, where images are decoded, how
streaming sets are dispatched, and on which BatchNorm statistics every process evaluates (a mixin of the trainer)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .collate import as_input_of
from .data import ImageClassificationCollator, check_same_classes, collator_for_split, defer_decoding


class TrainerData:
    """Trainer's dataloader and evaluation hooks for :class:`~hf_layerfold.trainer.LayerFoldingTrainer` (reads its
    ``_eval_collators``, ``_built_eval_set`` and ``_own_eval_collators``)."""

    def get_train_dataloader(self):
        with self._swapped("train_dataset", self.data_collator):
            return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset: Any = None):
        key = eval_dataset if isinstance(eval_dataset, str) else None  # a name: an entry of a dict of eval sets
        collator = self._eval_collators.get(key, self._eval_collators.get(None))
        if key is None and eval_dataset is not None and eval_dataset is not self._built_eval_set:
            collator = self._fitted(collator, eval_dataset, require_label=True)  # another set handed to evaluate()
            if self.train_dataset is not None:
                check_same_classes(self.train_dataset, eval_dataset, "the set handed to evaluate()")
        if key is not None:
            read = self.eval_dataset[key]
        else:
            read = eval_dataset if eval_dataset is not None else self.eval_dataset
        collator = collator if collator is not None else self.data_collator
        other_set = key is None and eval_dataset is not None and eval_dataset is not self.eval_dataset
        if eval_dataset is not None and key is None and isinstance(collator, ImageClassificationCollator):
            eval_dataset = defer_decoding(eval_dataset)
        with self._collator(collator), self._dispatched(read), self._swapped("eval_dataset", collator), \
                self._uncached(other_set):
            return super().get_eval_dataloader(eval_dataset)

    @contextlib.contextmanager
    def _uncached(self, other_set: bool):
        """With persistent workers Trainer caches one eval loader under "eval" (the eval set's, which ``evaluate``
        and the evaluations during training reuse) and would hand it out for any set given to ``evaluate``. A set
        other than the eval set gets a loader of its own, without persistent workers: accelerate keeps a reference
        to every loader it prepared, so the persistent workers of a loader dropped after one use would live on,
        two more processes per call. The cache is left alone."""
        if not other_set or not self.args.dataloader_persistent_workers:
            yield
            return
        self.args.dataloader_persistent_workers = False  # (Trainer neither reads nor writes the cache then)
        try:
            yield
        finally:
            self.args.dataloader_persistent_workers = True

    @contextlib.contextmanager
    def _swapped(self, name: str, collator: Any):
        """While a dataloader is built: the set ``name`` with its images left for ``collator`` to decode, when it is
        an :class:`~hf_layerfold.data.ImageClassificationCollator` (:func:`~hf_layerfold.data.defer_decoding`: a
        broken file is then named; any other collator gets what ``datasets`` decodes). The attribute itself keeps
        the set as it was given (a callback reading ``trainer.train_dataset[i]`` sees decoded images)."""
        given = getattr(self, name)
        if not isinstance(collator, ImageClassificationCollator) or given is None:
            yield
            return
        setattr(self, name, defer_decoding(given))
        try:
            yield
        finally:
            setattr(self, name, given)

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        """Trainer's loop (``evaluate`` and ``predict``), on rank 0's BatchNorm statistics on every process; under
        several processes the loss is recomputed from the gathered logits, which count every image once."""
        self._sync_buffers()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        return self._exact_loss(output, metric_key_prefix)

    def _exact_loss(self, output: Any, prefix: str) -> Any:
        """Trainer's ``eval_loss`` repeats each batch's mean loss once per image of the batch, and the last batches of
        an eval set that is no multiple of processes x batch size are padded with repeated images: the padded
        batch's mean stands in for its real images (13 images, 2 processes, batch 4: 2.887 against 3.241). The
        gathered logits are truncated exactly, so the plain cross-entropy (what ``compute_loss`` evaluates) is
        taken from them when they are kept as they came out of the model."""
        preds, labels, key = output.predictions, output.label_ids, f"{prefix}_loss"
        if (self.accelerator.num_processes == 1 or key not in output.metrics
                or self.preprocess_logits_for_metrics is not None
                or not isinstance(preds, np.ndarray) or not isinstance(labels, np.ndarray)
                or preds.ndim != 2 or labels.ndim != 1 or len(preds) != len(labels)
                or not np.issubdtype(preds.dtype, np.floating)):
            return output
        loss = F.cross_entropy(torch.from_numpy(preds).float(), torch.from_numpy(labels).long())
        output.metrics[key] = loss.item()
        return output

    def _sync_buffers(self) -> None:
        """Under DDP each process's BatchNorm keeps the running statistics of its own last batches (DDP copies rank
        0's buffers only at the start of a training forward): an evaluation would mix two models, neither quite
        the one rank 0 saves and folds. Every process takes rank 0's buffers first, one broadcast per dtype, once
        training has wrapped the model (on its device: NCCL takes no CPU tensors; before that the ranks hold what
        they loaded) and unless ``ddp_broadcast_buffers=False`` asked for per-process buffers."""
        if not isinstance(self.model_wrapped, nn.parallel.DistributedDataParallel) or \
                self.args.ddp_broadcast_buffers is False:
            return
        groups: dict[tuple, list[torch.Tensor]] = {}
        for buffer in self._model().buffers():
            groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
        for buffers in groups.values():
            flat = torch.cat([b.detach().reshape(-1) for b in buffers])
            torch.distributed.broadcast(flat, src=0)
            for b, value in zip(buffers, flat.split([b.numel() for b in buffers])):
                b.data.copy_(value.view_as(b))

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Trainer's step for labelled batches; unlabelled ones (``predict`` on a test set) call the timm model on
        ``pixel_values`` (Trainer would call ``model(**inputs)``, which a timm ``forward(x)`` refuses)."""
        if inputs.get("labels") is not None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if prediction_loss_only:
            return None, None, None
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = logits_of(model(as_input_of(model, inputs["pixel_values"])))
        return None, logits.detach(), None

    def get_test_dataloader(self, test_dataset: Any):
        collator = self._fitted(self._eval_collators.get(None), test_dataset, require_label=False)
        if self.train_dataset is not None:  # (a labelled set: predict() scores it; an unlabelled one passes)
            check_same_classes(self.train_dataset, test_dataset, "the set handed to predict()")
        collator = collator if collator is not None else self.data_collator
        if isinstance(collator, ImageClassificationCollator):
            test_dataset = defer_decoding(test_dataset)  # decoded by the collator, which names a broken file
        with self._collator(collator), self._dispatched(test_dataset), self._uncached(True):  # (never cached)
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _dispatched(self, dataset: Any):
        """A streaming set evaluated by several processes is read by rank 0 and its batches dispatched. The
        ``dispatch_batches=False`` a streaming training set gets (``trainer_args.adjust_args``) would have every
        process read the whole set, or a share of its shards, and the metrics then count the padding that evens out
        the processes' last batches (or wait forever on a process with fewer batches)."""
        config = self.accelerator.dataloader_config
        if (self.accelerator.num_processes == 1 or not isinstance(dataset, datasets.IterableDataset)
                or config.dispatch_batches is not False):
            yield
            return
        config.dispatch_batches = True
        try:
            yield
        finally:
            config.dispatch_batches = False

    def _fitted(self, collator: Any, dataset: Any, *, require_label: bool) -> Any:
        """A collator the trainer built, fitted to the columns of a set handed to evaluate / predict; a collator of
        the user's is theirs to fit."""
        if not self._own_eval_collators:
            return collator
        return collator_for_split(collator, dataset, require_label=require_label)

    @contextlib.contextmanager
    def _collator(self, collator: Any):
        saved = self.data_collator
        if collator is not None:
            self.data_collator = collator
        try:
            yield
        finally:
            self.data_collator = saved


def logits_of(outputs: Any) -> torch.Tensor:
    """timm returns a tensor; transformers wrappers return an output object with ``.logits``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]
