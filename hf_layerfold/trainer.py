"""``LayerFoldingTrainer``: α search, plan fixing and fine-tuning of a timm CNN in one ``trainer.train()``.

Phase 1 (search) learns one α per site with the task loss + λ·regularizer(α); phase 2 (fine-tune) fixes the
plan from the threshold (``apply_plan``: α exactly 0/1 and frozen, padding moved) and trains the weights of
the network that will actually be folded. Both phases, α and the plan survive ``resume_from_checkpoint``.
Given a model that is already folded (a ``LayerFoldedNet``), training is a plain fine-tune of its merged convs
(phase ``"folded"``): fewer layers, so each step costs less than the planned network's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import get_last_checkpoint, has_length

from .collate import as_input_of, model_input_shape, pretrained_cfg_of
from .config import LayerFoldingConfig
from .data import (
    HF_DATASETS,
    check_dataset_labels,
    check_same_classes,
    dataset_label_names,
    eval_collators,
    prepare_datasets,
)
from .folded_net import LayerFoldedNet
from .graph import wrapper_error
from .losses import alpha_regularizer, clamp_alphas_, clamp_schedule_free_alphas_, distillation_loss
from .metrics import BatchedTopK, check_metric_name, compute_metrics
from .phases import (
    FINETUNE,
    FOLDED,
    PHASE_IDS,
    SEARCH,
    STATE_NAME,
    initial_phase,
    resolve_search_steps,
    restore_phase,
)
from .plan import FoldPlan, applied_plan, apply_plan, past_threshold
from .prepare import (
    alpha_parameters,
    ensure_prepared,
    site_regularizer_weights,
    unique_alphas,
)
from .stats import projected_stats
from .trainer_args import (
    adjust_args,
    caller_values,
    checkpointing_through_timm,
    sharded_alpha_error,
    timm_checkpointing,
)
from .trainer_data import TrainerData, logits_of
from .trainer_saving import TrainerSaving

logger = logging.getLogger(__name__)

ALPHA_GROUP = "layerfold_alpha"  # marks the optimizer param group that holds α

__all__ = ["ALPHA_GROUP", "LayerFoldingTrainer", "STATE_NAME", "compute_metrics"]
_default_metrics = compute_metrics  # (the constructor's argument of that name shadows it)


def checked_teacher(model: nn.Module, teacher: nn.Module | None, config: LayerFoldingConfig,
                    config_given: bool) -> LayerFoldingConfig:
    """The config to train with, after checking the teacher against it and the model, before any step runs.

    A distillation weight that a reloaded folded save carries (``config_given`` False) named the teacher of the run
    that trained it, not one of this run: without a teacher it is dropped with a warning. A prepared model's own
    config is what the user asked for: refused like a given one."""
    if config.distill_weight > 0 and teacher is None:
        if config_given:
            raise ValueError(f"LayerFoldingConfig.distill_weight={config.distill_weight} needs a teacher_model")
        if not isinstance(model, LayerFoldedNet):  # the config the user prepared the model with: a request
            raise ValueError(f"the model's layerfold_config (from prepare_model / prepare_with_plan) has "
                             f"distill_weight={config.distill_weight}, which needs a teacher_model; to train "
                             "without distillation pass "
                             "layerfold_config=dataclasses.replace(model.layerfold_config, distill_weight=0)")
        logger.warning("the model's layerfold_config has distill_weight=%s (the run that trained it distilled); no "
                       "teacher_model is given, so this run trains without distillation", config.distill_weight)
        return dataclasses.replace(config, distill_weight=0.0)
    if teacher is None:
        return config
    if config.distill_weight == 0:
        logger.warning("teacher_model is given but distill_weight=0: the teacher is not used")
        return config
    if teacher is model or {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}:
        raise ValueError("teacher_model is (or shares weights with) the model being trained: the teacher is frozen, "
                         "which would freeze the model too; pass a copy, e.g. teacher_model=copy.deepcopy(model)")
    teacher_classes = getattr(teacher, "num_classes", None)
    if teacher_classes is None:  # a transformers classifier names its classes in its config
        teacher_classes = getattr(getattr(teacher, "config", None), "num_labels", None)
    if teacher_classes is not None and teacher_classes != getattr(model, "num_classes", teacher_classes):
        raise ValueError(f"the teacher predicts {teacher_classes} classes, the model {model.num_classes}: "
                         "distillation compares their outputs class by class; give a teacher with the model's "
                         "head (fine-tuned on the same classes)")
    norms = [tuple(tuple(pretrained_cfg_of(m).get(k) or ()) for k in ("mean", "std"))  # (TimmWrapper: its config's)
             for m in (model, teacher)]
    if all(all(n) for n in norms) and norms[0] != norms[1]:
        logger.warning("the teacher was trained with mean/std %s, the model with %s: the teacher gets the model's "
                       "pixel_values, normalized for the model", norms[1], norms[0])
    return config


class _LayerFoldingCallback(TrainerCallback):
    """Optimizer-step hooks: frozen α never moves, searched α stays in [0, 1]."""

    def __init__(self, trainer: LayerFoldingTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # A frozen α must not be touched by momentum either: drop any gradient a wrapper may have written.
        for alpha in self.trainer._alpha_params:
            if not alpha.requires_grad:
                alpha.grad = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._forget_search_best(state)
        self.trainer._trained = False
        self.trainer._own_evals.clear()  # (an evaluation before this train() describes no model it ends with)
        self.trainer._stats.zero_()  # (auto_find_batch_size restarts here after a batch that ran out of memory)

    def on_optimizer_step(self, args, state, control, **kwargs):
        clamp_alphas_(self.trainer._alpha_params)
        clamp_schedule_free_alphas_(self.trainer.optimizer, self.trainer._alpha_params)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._finish_search_at_end()
        self.trainer._trained = True


class LayerFoldingTrainer(TrainerData, TrainerSaving, Trainer):
    """``transformers.Trainer`` for Layer Folding of a bare timm model (prepared here if it is not yet).

    Args:
        model: a timm CNN, plain (it is prepared with ``layerfold_config``), prepared, or already planned
            (then training is the fine-tune phase only); or a folded ``LayerFoldedNet`` (``fold_model``,
            ``LayerFoldedModel.from_pretrained``): then a plain fine-tune of the folded network, with distillation
            when configured. It has no BatchNorm left, so it wants a lower learning rate than the unfolded network
            (on the Fashion-MNIST proxy 1e-3 diverged, 3e-4 trained).
        layerfold_config: what to fold and the knobs of both phases (λ, regularizer, threshold, ``alpha_lr``,
            ``search_steps`` / ``search_epochs`` — default: half of training —, distillation).
        teacher_model: a frozen teacher for distillation (used when ``distill_weight > 0``); it gets the same
            ``pixel_values`` as the student.
        train_dataset / eval_dataset: ``datasets`` objects with an image and a label column (collators are built
            with :func:`hf_layerfold.data.prepare_datasets` unless ``data_collator`` is given; a ``with_transform``
            returning ``pixel_values`` and ``labels`` works too) or any dataset yielding ``{"pixel_values",
            "labels"}`` batches through your ``data_collator``; ``eval_dataset`` may
            be a dict of such sets (each evaluated under its name). A streaming training set is split between
            processes by shard (``dispatch_batches=False`` unless you set it).
        eval_data_collator: collator for evaluation / prediction (default: for ``datasets`` splits the
            deterministic one built from the model's data config, else ``data_collator``).
        input_size: resolution of the built collators (default: the model's).
        compute_metrics: default :func:`compute_metrics` (eval_top1 / eval_top5).

    The loss is ``(1 − w)·CE + w·KD + λ·R(α)``; ``w = distill_weight`` (0 without teacher), ``R`` only in the
    search phase; label smoothing comes from ``TrainingArguments.label_smoothing_factor``. α sits in its own
    optimizer group (``lr = alpha_lr``, no weight decay) and is clamped to [0, 1] after every optimizer step (once
    per ``gradient_accumulation_steps`` micro-batches); that group's lr follows the ``lr_scheduler_type`` schedule
    (warm-up and decay) like the weights', and ``max_grad_norm`` clips α's gradient together with the weights' (one
    global norm). An optimizer passed as ``optimizers=`` must already hold every α (build it after
    ``prepare_model``); without a group marked ``ALPHA_GROUP`` α gets that optimizer's lr and weight decay.
    Evaluation (``eval_strategy``, ``evaluate``, ``predict``) runs the model as it is at that moment — during the
    search the soft-α network, not the threshold plan, and only fine-tune evaluations count for
    ``load_best_model_at_end`` — and ``eval_loss`` is plain cross-entropy (no label smoothing, distillation or
    regularizer). The teacher stays outside accelerate (not wrapped, compiled or optimized), in eval mode on
    ``args.device``, under the model's autocast (``bf16`` / ``fp16``). A second ``train()`` of a model whose plan
    is fixed is a fine-tune only. Distributed training is DDP: FSDP and DeepSpeed ZeRO-3 are refused for a model
    with α (:func:`sharded_alpha_error` says why).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        *,
        layerfold_config: LayerFoldingConfig | None = None,
        teacher_model: nn.Module | None = None,
        eval_data_collator: Any = None,
        input_size: int | tuple[int, ...] | None = None,
        compute_metrics: Any = compute_metrics,
        **kwargs: Any,
    ) -> None:
        if model is None or kwargs.get("model_init") is not None:
            raise ValueError("LayerFoldingTrainer needs a model instance (model_init is not supported)")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("LayerFoldingTrainer computes its own loss; compute_loss_func is not supported")
        wrapped = wrapper_error(model)  # (a wrapped prepared model trained until the first log or the plan)
        if wrapped is not None:
            raise wrapped
        config = ensure_prepared(model, layerfold_config)
        self.layerfold_config = config = checked_teacher(model, teacher_model, config, layerfold_config is not None)
        site_alphas = alpha_parameters(model)  # (Trainer moves the model in place: the α objects stay the same)
        reg_weights = None if not site_alphas else site_regularizer_weights(list(site_alphas),
                                                                            config.regularizer_weights)
        num_classes = getattr(model, "num_classes", None)
        if num_classes == 0:
            raise ValueError(f"{type(model).__name__} has no classifier (num_classes=0): its outputs are pooled "
                             "features, not class logits. Create it with num_classes=<the dataset's classes>, or "
                             "add a head with model.reset_classifier(num_classes).")
        user_collator = data_collator
        if data_collator is None and isinstance(train_dataset, HF_DATASETS):
            train_dataset, picked_eval, data_collator, _ = prepare_datasets(model, train_dataset, input_size=input_size)
            eval_dataset = picked_eval if eval_dataset is None else eval_dataset
        elif num_classes:
            check_dataset_labels(train_dataset, int(num_classes), "the training set")
        if (user_collator is not None or eval_data_collator is not None) and num_classes:
            check_dataset_labels(eval_dataset, int(num_classes), "the eval set")  # no collator of ours was built for it
        if eval_dataset is not None and train_dataset is not None:
            check_same_classes(train_dataset, eval_dataset)
        self._eval_collators = eval_collators(model, eval_dataset, train_dataset, given=eval_data_collator,
                                              user_collator=user_collator, input_size=input_size)
        self._own_eval_collators = eval_data_collator is None and user_collator is None
        self._built_eval_set = eval_dataset  # the set those collators read (fitted to no other)
        args = args if args is not None else TrainingArguments(output_dir="tmp_trainer")
        adjust_args(args, train_dataset)
        checkpointing_through_timm(model, args)  # a model that cannot checkpoint fails here, not in train()
        if input_size is not None:
            model_input_shape(model, input_size)  # a wrong size or channel count fails here, not at save_folded
        self._input_size = input_size
        self._label_names = dataset_label_names(train_dataset if train_dataset is not None else eval_dataset)

        if args.label_names is not None and list(args.label_names) != ["labels"]:
            raise ValueError(f"label_names={args.label_names}: LayerFoldingTrainer's batches name the labels 'labels', "
                             "whatever the dataset's column is called; leave label_names unset")
        if args.batch_eval_metrics and compute_metrics is _default_metrics:
            compute_metrics = BatchedTopK()  # the same metrics, counted batch by batch
        if args.neftune_noise_alpha is not None:  # Trainer would fail at train() on model.get_input_embeddings
            raise ValueError(f"neftune_noise_alpha={args.neftune_noise_alpha}: NEFTune adds noise to a language "
                             "model's input embeddings, which a timm CNN has not; leave neftune_noise_alpha unset")
        if args.push_to_hub and isinstance(model, LayerFoldedNet):  # Trainer's push has no folded spec to send
            raise ValueError("push_to_hub=True with a folded net would publish weights without their structure: "
                             "publish it with trainer.save_folded(push_to_hub=True, repo_id=...) after training")
        if not hasattr(model, "main_input_name"):  # what Trainer reads for include_for_metrics=["inputs"]
            model.main_input_name = "pixel_values"

        # Trainer reads model.config for label smoothing, which a timm model has not: smoothing is applied here.
        self._label_smoothing = float(args.label_smoothing_factor)
        args.label_smoothing_factor = 0.0
        try:
            super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, compute_metrics=compute_metrics, **kwargs)
        finally:
            args.label_smoothing_factor = self._label_smoothing
        error = sharded_alpha_error(len(site_alphas), self.is_fsdp_enabled, is_deepspeed_zero3_enabled())
        if error:
            raise ValueError(error)
        self.label_smoother = None
        if args.label_names is None:
            self.label_names = ["labels"]  # timm's forward(x) names no label argument
        self.can_return_loss = False

        self.teacher_model = None
        if teacher_model is not None and config.distill_weight > 0:
            self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self._alphas = list(site_alphas.values())  # per site: the regularizer sums over sites
        self._alpha_params = unique_alphas(self._alphas)  # each α once: the optimizer-step hooks
        self._reg_weights = None if reg_weights is None else torch.tensor(reg_weights, device=self.args.device)
        self._phase = initial_phase(model)
        self._search_steps: int | None = None
        self._resumed_search_steps: int | None = None
        self._hidden_args: dict[str, Any] = {}  # what train() hides from Trainer (see trainer_args.timm_checkpointing)
        self._stats = torch.zeros(4, device=self.args.device)  # Σ task, Σ λ·R, Σ distill, optimizer steps (weighted)
        self._own_evals: list[tuple[int, bool, dict]] = []  # (step, after train() ended, metrics)
        self._trained = False
        self.add_callback(_LayerFoldingCallback(self))

    # ------------------------------------------------------------------------------------------------
    # Setup

    def _model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def hyperparameter_search(self, *args: Any, **kwargs: Any):
        """Not supported: a search builds each trial's model with ``model_init``, which this trainer does not take
        (its model is prepared, and its α registered, once)."""
        raise NotImplementedError("LayerFoldingTrainer does not support hyperparameter_search (it needs model_init); "
                                  "run one trainer per setting instead")

    # ------------------------------------------------------------------------------------------------
    # Optimizer: α in its own group

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, with every α moved to a group of its own (``alpha_lr``, no weight decay).

        Frozen α (a planned model) are kept in the group too, so a resumed run has the same groups as the
        run that wrote the checkpoint.
        """
        if self.optimizer is not None:
            given = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            trainable = [a for a in self._alpha_params if a.requires_grad]
            missing = [a for a in trainable if id(a) not in given]
            if missing:  # e.g. built from the model before the trainer prepared it: the search would not move α
                raise ValueError(
                    f"the optimizer given to LayerFoldingTrainer holds {len(trainable) - len(missing)} of the "
                    f"{len(trainable)} trainable α parameters, so the search could not move the others. "
                    "Build it after the model is prepared (lf.prepare_model(model, config) first), ideally with α "
                    f"in a group of its own marked {{{ALPHA_GROUP!r}: True}}")
            if not any(g.get(ALPHA_GROUP) for g in self.optimizer.param_groups):
                logger.warning("the optimizer given to LayerFoldingTrainer has no α group; alpha_lr and the "
                               "no-weight-decay rule for α are not applied")
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        alphas = unique_alphas(alpha_parameters(self.model if model is None else model).values())
        if not alphas:  # a folded model
            return optimizer
        ids = {id(a) for a in alphas}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        # alpha_lr=None: the optimizer's own lr (optimizer_cls_and_kwargs / optim_args may set another)
        lr = self.layerfold_config.alpha_lr or optimizer.defaults.get("lr") or self.args.learning_rate
        optimizer.add_param_group({"params": alphas, "lr": lr, "weight_decay": 0.0, ALPHA_GROUP: True})
        return optimizer

    # ------------------------------------------------------------------------------------------------
    # Loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, dict]:
        pixel_values, labels = inputs["pixel_values"], inputs.get("labels")
        if labels is None:
            raise ValueError("LayerFoldingTrainer needs batches with 'labels' (image classification)")
        logits = logits_of(model(as_input_of(model, pixel_values)))
        if not model.training:  # evaluation: plain cross-entropy
            loss = F.cross_entropy(logits.float(), labels)
            return (loss, {"logits": logits}) if return_outputs else loss

        cfg = self.layerfold_config
        task = F.cross_entropy(logits.float(), labels, label_smoothing=self._label_smoothing)
        loss, distill = task, task.new_zeros(())
        if self.teacher_model is not None:
            with torch.no_grad(), self.accelerator.autocast():  # the student's mixed precision (bf16 / fp16)
                teacher_logits = logits_of(self.teacher_model(as_input_of(self.teacher_model, pixel_values)))
            if teacher_logits.shape != logits.shape:
                raise ValueError(f"the teacher's outputs have shape {tuple(teacher_logits.shape)}, the model's "
                                 f"{tuple(logits.shape)}: distillation compares them class by class; give a teacher "
                                 "with the model's head (fine-tuned on the same classes)")
            distill = distillation_loss(logits, teacher_logits, cfg.distill_temperature)
            loss = (1.0 - cfg.distill_weight) * task + cfg.distill_weight * distill
        reg = task.new_zeros(())
        if self._phase == SEARCH and cfg.lambda_reg > 0:
            reg = cfg.lambda_reg * alpha_regularizer(self._alphas, cfg.regularizer, self._reg_weights)
            loss = loss + reg
        # Weighted as Trainer weights the logged `loss`: each micro-batch by 1 / (micro-batches in its optimizer step),
        # so that a window holding the short last step of an epoch averages the terms exactly as it averages `loss`.
        share = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        self._stats += torch.stack([task.detach(), reg.detach(), distill.detach(), torch.ones_like(task)]) * share
        return (loss, {"logits": logits}) if return_outputs else loss

    # ------------------------------------------------------------------------------------------------
    # Phases

    def set_initial_training_values(self, args: TrainingArguments, dataloader: Any) -> tuple:
        values = super().set_initial_training_values(args, dataloader)
        steps_per_epoch, max_steps = values[1], values[6]
        self._search_steps = resolve_search_steps(self.layerfold_config, self._phase, self._resumed_search_steps,
                                                  sized=has_length(dataloader), steps_per_epoch=steps_per_epoch,
                                                  max_steps=max_steps)
        if self._phase == SEARCH and self._search_steps < max_steps and self.is_deepspeed_enabled:
            raise ValueError(
                "fixing the plan mid-run swaps conv modules, which DeepSpeed cannot follow. Run the search alone "
                f"(search_steps >= max_steps={max_steps}), then apply_plan and fine-tune in a second run (see "
                "examples/README.md)")
        alpha_ids = {id(a) for a in self._alpha_params}
        if (self._phase != FOLDED and self._search_steps < max_steps
                and not any(p.requires_grad for p in self._model().parameters() if id(p) not in alpha_ids)):
            raise ValueError(
                "every weight of the model is frozen (requires_grad=False) and the plan freezes α: the fine-tune "
                f"phase (steps {self._search_steps}-{max_steps}) would have nothing to train. Unfreeze some weights "
                "(e.g. the classifier), or run the search alone with search_steps >= max_steps")
        if self._phase == SEARCH:
            logger.info("Layer Folding: search phase for %d steps, then fine-tune for %d",
                        min(self._search_steps, max_steps), max(max_steps - self._search_steps, 0))
            if args.save_strategy == "best" and self._search_steps < max_steps:  # (see _determine_best_metric)
                logger.warning("save_strategy='best' writes no checkpoint during the search phase (steps 1-%d): only "
                               "fine-tune evaluations count as best, so an interrupted search cannot be resumed; "
                               "save_strategy='steps' (or 'epoch') checkpoints the search too", self._search_steps)
        return values

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self._phase == SEARCH and self._search_steps is not None and self.state.global_step >= self._search_steps:
            self._end_search()
        return super().training_step(model, inputs, num_items_in_batch)

    def _end_search(self) -> FoldPlan:
        """Fix the plan from the threshold (identical on every process: rank 0's decision is broadcast)."""
        model = self._model()
        if callable(getattr(self.optimizer, "train", None)):  # schedule-free: read α as trained (y), not as an
            self.optimizer.train()                             # evaluation just before left it (x)
        plan = FoldPlan.from_model(model, threshold=self.layerfold_config.threshold)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            plan = FoldPlan.from_dict(broadcast_object_list([plan.to_dict()], from_process=0)[0])
        apply_plan(model, plan, self.layerfold_config)
        self._forget_alpha_state()
        self._phase = FINETUNE
        logger.info("Layer Folding: plan fixed at step %d, %d of %d sites linear", self.state.global_step,
                    len(plan), len(self._alphas))
        return plan

    def _forget_alpha_state(self) -> None:
        """Drop the optimizer state of the α just frozen at 0/1: a schedule-free optimizer (``optim=
        "schedule_free_*"``) moves every parameter with state between its train (y) and eval (x) points in
        ``optimizer.train()`` / ``optimizer.eval()``, which took frozen α off 0/1 (and out of [0, 1])."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # (accelerate's AcceleratedOptimizer)
        state = getattr(inner, "state", None)
        if state is None:
            return
        for alpha in self._alpha_params:
            if not alpha.requires_grad:
                state.pop(alpha, None)

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        """``load_best_model_at_end`` may only pick a checkpoint of the phase the run ends in: a search-phase model
        (soft α) loaded into the planned network would be a model nobody evaluated, its α disagreeing with the
        plan. So while a search that ends mid-run is going on, no evaluation counts as best."""
        if self._phase == SEARCH and self._search_steps is not None and self._search_steps < self.state.max_steps:
            check_metric_name(self.args.metric_for_best_model, metrics)  # a typo fails now, not after the search
            return False
        return super()._determine_best_metric(metrics, trial)

    def _forget_search_best(self, state: Any) -> None:
        """The same rule for a best checkpoint restored with the trainer state: a search-only run (the search took
        all its steps) could record a search-phase best, which a resumed run that goes on to fine-tune must not
        load at its end."""
        best, search = state.best_global_step, self._search_steps
        if search is None or not best or best > search:
            return
        if self._phase == FINETUNE or (self._phase == SEARCH and search < state.max_steps):  # the run ends planned
            logger.info("forgetting the best checkpoint of the search phase (step %d): only fine-tune evaluations "
                        "count for load_best_model_at_end", best)
            state.best_metric = state.best_global_step = state.best_model_checkpoint = None

    def _finish_search_at_end(self) -> None:
        if (self._phase == SEARCH and self._search_steps is not None and self.state.global_step >= self._search_steps
                and not self.is_deepspeed_enabled):
            self._end_search()

    @property
    def phase(self) -> str:
        """``"search"`` while α is learned, ``"finetune"`` once the plan is fixed, ``"folded"`` for a folded model."""
        return self._phase

    @property
    def search_steps(self) -> int | None:
        """Length of the search phase in optimizer steps (known once training starts)."""
        return self._search_steps

    # ------------------------------------------------------------------------------------------------
    # Logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (emitted on every process): add the Layer Folding view
            logs.update(self._layerfold_logs())
        super().log(logs, start_time)

    def _layerfold_logs(self) -> dict[str, float]:
        stats = self._stats.clone()
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        self._stats.zero_()
        n = float(stats[3]) if float(stats[3]) > 0 else 1.0  # optimizer steps since the last log, over processes
        out = {"task_loss": float(stats[0]) / n, "reg_loss": float(stats[1]) / n}
        if self.teacher_model is not None:
            out["distill_loss"] = float(stats[2]) / n
        if self._phase == FOLDED:  # no α, no plan: the structure is fixed
            return {**out, "phase": PHASE_IDS[FOLDED]}
        model = self._model()
        threshold = self.layerfold_config.threshold
        alphas = torch.stack([a.detach().float() for a in self._alphas])
        plan = applied_plan(model)
        if plan is None:
            plan = FoldPlan.from_model(model, threshold=threshold)
        projected = projected_stats(model, plan)
        out.update(alpha_mean=float(alphas.mean()), sites_past_threshold=int(past_threshold(alphas, threshold).sum()),
                   projected_nonlinear_layers=projected.nonlinear_layers, projected_depth=projected.depth,
                   phase=PHASE_IDS[self._phase])
        return out

    # ------------------------------------------------------------------------------------------------
    # Training

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None):
        """Trainer's ``train``; on resume the checkpoint's phase and plan are restored before its weights."""
        if (isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "false")
                and not os.path.exists(resume_from_checkpoint)):  # --resume_from_checkpoint true (a str field)
            resume_from_checkpoint = resume_from_checkpoint.lower() == "true"
        if isinstance(resume_from_checkpoint, bool):
            if resume_from_checkpoint:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            else:
                resume_from_checkpoint = None
        self._resumed_search_steps = None
        self._stats.zero_()  # micro-batches a previous train() ran after its last log are not this run's
        if resume_from_checkpoint is not None:
            self._phase, self._resumed_search_steps = restore_phase(resume_from_checkpoint, self._model(),
                                                                    self._phase, self.layerfold_config)
        else:
            self._phase = initial_phase(self._model())
        with timm_checkpointing(self._model(), self.args) as hidden:
            self._hidden_args = hidden
            try:
                return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                     ignore_keys_for_eval=ignore_keys_for_eval)
            finally:
                self._hidden_args = {}

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        with caller_values(self.args, self._hidden_args):
            super()._save_checkpoint(model, trial)
