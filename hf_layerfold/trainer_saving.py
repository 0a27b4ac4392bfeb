"""What ``LayerFoldingTrainer`` writes: checkpoints that rebuild the run (phase, plan, config beside the weights),
Trainer's pushes and card, and the folded model with the evaluation that describes it (a mixin of the trainer)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .collate import model_input_shape
from .config import LAYERFOLD_CONFIG_NAME
from .files import write_text_atomic
from .model_card import training_run_card
from .phases import FOLDED, SEARCH, STATE_NAME, PhaseState
from .plan import FoldPlan, applied_plan

logger = logging.getLogger("hf_layerfold.trainer")  # (the trainer's messages under its name, as trainer_args)



class TrainerSaving:
    """Trainer's save, push and card hooks, ``save_folded`` and the evaluations kept for the card, for
    :class:`~hf_layerfold.trainer.LayerFoldingTrainer` (reads its phase, config, α, label names and input size)."""

    # ------------------------------------------------------------------------------------------------
    # Checkpoints and Trainer's pushes

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's save, plus ``layerfold_state.json`` (phase, plan, search length) and the config."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            PhaseState(self._phase, self._search_steps, self.state.global_step,
                       applied_plan(self._model())).write(output_dir, self.layerfold_config)
        super().save_model(output_dir, _internal_call=_internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer writes a timm model's state dict with safetensors, which refuses tensors that are not contiguous:
        a model in ``channels_last`` (timm's ``--channels-last``) failed at its first checkpoint. The weights are
        written contiguous (loading copies them back into the model's own layout)."""
        if self.args.should_save:
            if state_dict is None:
                state_dict = self.model.state_dict()
            state_dict = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
        super()._save(output_dir, state_dict=state_dict)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer copies only transformers' files from a checkpoint to the folder it pushes: the phase, plan and
        config go too, or the pushed weights could not be rebuilt."""
        if self._trainer_pushes_now():  # (a push still running is not followed by another, nor its files changed)
            for name in (STATE_NAME, LAYERFOLD_CONFIG_NAME):
                if (Path(checkpoint_folder) / name).is_file():
                    shutil.copy(Path(checkpoint_folder) / name, Path(self.args.output_dir) / name)
        super()._push_from_checkpoint(checkpoint_folder)

    def _trainer_pushes_now(self) -> bool:
        """What transformers' ``_push_from_checkpoint`` checks before it copies and pushes (transformers 5.x)."""
        return self.is_world_process_zero() and self.args.hub_strategy != "end" and (
            self.args.hub_always_push or self.push_in_progress is None or self.push_in_progress.is_done())

    def create_model_card(self, language: str | None = None, license: str | None = None,
                          tags: str | list[str] | None = None, model_name: str | None = None,
                          finetuned_from: str | None = None, tasks: str | list[str] | None = None,
                          dataset_tags: str | list[str] | None = None, dataset: str | list[str] | None = None,
                          dataset_args: str | list[str] | None = None) -> None:
        """Trainer's card reads ``model.config``, which a timm model has not (``push_to_hub`` failed there): a card
        saying what the pushed weights are and how to rebuild them instead. Takes Trainer's arguments (which
        ``push_to_hub(**kwargs)`` forwards): ``language``, ``license``, ``tags``, ``finetuned_from`` (the card's
        ``base_model``) and ``dataset_tags`` (Hub dataset ids) go to its metadata; ``model_name``, ``tasks``,
        ``dataset`` and ``dataset_args`` are accepted and unused (the title names the run, the task is image
        classification)."""
        if not self.is_world_process_zero():
            return
        model = self._model()
        plan = applied_plan(model)
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        repo = getattr(self, "hub_model_id", None) or self.args.hub_model_id or Path(self.args.output_dir).name
        text = training_run_card(repo, arch, int(getattr(model, "num_classes", 0)), self._phase,
                                 None if plan is None else len(plan), len(self._alphas),
                                 in_chans=int(getattr(model, "in_chans", 3)), language=language, license=license,
                                 tags=tags, base_model=finetuned_from, datasets=dataset_tags)
        write_text_atomic(Path(self.args.output_dir) / "README.md", text)

    # ------------------------------------------------------------------------------------------------
    # Export

    def save_folded(self, output_dir: str | os.PathLike | None = None, **kwargs: Any) -> Path:
        """Fold the trained model and save it with :func:`hf_layerfold.hub.save_folded`.

        Under several processes only the main one writes; like ``save_model`` it may be called on every process or
        on the main one alone (``if trainer.is_world_process_zero():``), and takes part in no collective. Other
        processes that read the saved folder afterwards must wait for it themselves
        (``trainer.accelerator.wait_for_everyone()`` on every process).

        A model still in the search phase is folded with the threshold plan. Defaults passed on: the trainer's
        config, the base architecture, the class names of the training set, the trained input size and the
        last evaluation of the planned network (as ``eval_results`` when a dataset id is known from ``datasets=``
        or, as ``owner/name``, from the eval set's info; one made while α was still searched describes another
        network and is not carded).
        Any ``hub.save_folded`` argument (``push_to_hub``, ``repo_id``, ``overwrite``, card fields) may be given.
        """
        from .hub import save_folded

        output_dir = Path(output_dir) if output_dir is not None else Path(self.args.output_dir) / "folded"
        model = self._model()
        if self._phase == FOLDED:  # the card keeps the config that planned it, when the net records one
            kwargs.setdefault("config", getattr(model, "layerfold_config", None) or self.layerfold_config)
        else:  # (a folded net's own architecture names no base model)
            kwargs.setdefault("config", self.layerfold_config)
            kwargs.setdefault("base_model", (getattr(model, "pretrained_cfg", None) or {}).get("architecture"))
        if kwargs.get("push_to_hub"):  # what TrainingArguments says about the Hub, as Trainer's own pushes follow it
            if self.args.hub_private_repo:
                kwargs.setdefault("private", True)
            if self.args.hub_token:
                kwargs.setdefault("token", self.args.hub_token)
            if self.args.hub_revision and not kwargs.get("create_pr"):  # Trainer's pushes go to that revision
                kwargs.setdefault("revision", self.args.hub_revision)
        if self._label_names is not None and len(self._label_names) == getattr(model, "num_classes", -1):
            kwargs.setdefault("label_names", self._label_names)
        if self._input_size is not None:
            kwargs.setdefault("pretrained_cfg_overlay", {"input_size": model_input_shape(model, self._input_size)})
        if "eval_results" not in kwargs and self._phase == SEARCH:
            # what evaluate() measured is the blended network (α between 0 and 1), not the threshold-planned net
            # folded below: not this model's numbers
            logger.info("save_folded: no evaluation on the card: evaluate() measured the network still searching "
                        "α, not the threshold-planned one folded here (pass eval_results= to card one)")
        elif "eval_results" not in kwargs:
            results = self._eval_results(kwargs.get("datasets"))
            if results is not None:
                kwargs["eval_results"] = results
            if "accuracy" not in kwargs:  # the card's text section needs no Hub dataset id (as the CLI's card)
                accuracy = self._accuracy_field(results)
                if accuracy is not None:
                    kwargs["accuracy"] = accuracy
        if self._phase == SEARCH:
            past = len(FoldPlan.from_model(model, threshold=self.layerfold_config.threshold))
            logger.warning("save_folded during the search phase: the model is folded with the threshold plan (%d of "
                           "%d sites past %s); every other site keeps its original activation rather than its "
                           "blend at the current α, so the folded model computes a network that was not "
                           "fine-tuned", past, len(self._alphas), self.layerfold_config.threshold)
        path = output_dir
        if self.args.should_save:  # a model still searching is folded (on a copy) with the threshold plan
            path = save_folded(model, output_dir, **kwargs)
        # No barrier here: a call on the main process alone (the usual guard, fine for save_model) waited in it for
        # processes that never came, and failed when they left ("Connection closed by peer" on gloo; on NCCL a hang
        # until the process-group timeout).
        return Path(path)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer's ``evaluate``; what it measured on the trainer's own eval set is kept for the model card."""
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if eval_dataset is None and metric_key_prefix == "eval" and "eval_top1" in metrics:
            if self._phase != SEARCH:  # (a searching network is not the planned one that gets folded)
                self._own_evals.append((self.state.global_step, self._trained, metrics))
        return metrics

    def _carded_metrics(self) -> dict | None:
        """The evaluation that describes the model being saved: one made after training, else, when training ended
        by loading its best checkpoint, that checkpoint's, else the last (on the trainer's eval set only: a set
        handed to ``evaluate`` is another dataset)."""
        history = [(e.get("step"), False, e) for e in self.state.log_history if "eval_top1" in e
                   and (e.get("step") or 0) > (self._search_steps or 0)]  # (not the search's)
        evals = self._own_evals or history
        after = [m for _, trained, m in evals if trained]
        if after:
            return after[-1]
        best = self.state.best_global_step if self.args.load_best_model_at_end else None
        # (a resumed run's best may predate the resume: then only the restored log history has it)
        at_best = [m for step, _, m in (*evals, *history) if best and step == best]
        return at_best[0] if at_best else (evals[-1][2] if evals else None)

    def _accuracy_field(self, results: dict | None) -> dict | None:
        """The card's "Measured accuracy" section from the evaluation :meth:`_carded_metrics` picks (any eval set:
        a local folder has no Hub id for the model-index metadata, but its figure still belongs on the card)."""
        metrics = self._carded_metrics()
        if metrics is None or "eval_top1" not in metrics or isinstance(self.eval_dataset, Mapping):
            return None
        top1 = float(metrics["eval_top1"])
        if not 0.0 <= top1 <= 1.0:  # a compute_metrics of its own in percent (timm.utils.accuracy's): not refused
            logger.info("save_folded: eval_top1 %s is no fraction in [0, 1] (a compute_metrics reporting percent?): "
                        "the card's accuracy section leaves it out (pass accuracy= to card it)", top1)
            return None
        split = getattr(self.eval_dataset, "split", None)
        if split and str(split) == str(getattr(self.train_dataset, "split", None) or ""):
            split = f"{split}[held-out]"  # (train_test_split keeps the split name: not the training accuracy)
        field = {"after": top1, "split": str(split) if split else "evaluation", "metric": "top-1 accuracy"}
        if results is not None:
            field["dataset"] = results["dataset"]
        try:
            field["images"] = len(self.eval_dataset)
        except TypeError:  # a streaming set: take(n) / --max_eval_samples keeps the split's name, so say streamed
            field["streamed"] = True
        return field

    def _eval_results(self, dataset_ids: Any) -> dict | None:
        metrics = self._carded_metrics()
        if metrics is None:
            return None
        dataset = dataset_ids if isinstance(dataset_ids, str) else (dataset_ids or [None])[0]
        if dataset is None:  # `datasets` names a local folder's set after the folder ('wds') or its builder
            info = getattr(self.eval_dataset, "info", None)  # ('imagefolder'), a Hub one without its owner
            dataset = getattr(info, "dataset_name", None)  # ('fashion_mnist'): only an owner/name is an id
            if not isinstance(dataset, str) or dataset.count("/") != 1:
                dataset = None
        if dataset is None:
            logger.info("save_folded: no Hub dataset id known (pass datasets='org/name'): the card's model-index "
                        "metadata leaves the evaluation out (the card's 'Measured accuracy' section still gives it)")
            return None
        result = {"dataset": dataset, "metrics": {"top1": metrics["eval_top1"], "top5": metrics["eval_top5"]}}
        try:  # what the figure was measured on, in the card: a subset is not the split
            result["dataset_name"] = f"{dataset} ({len(self.eval_dataset)} evaluation images)"
        except TypeError:  # a streaming set: no length, so a subset of it (take(n), --max_eval_samples) is unknown
            result["dataset_name"] = f"{dataset} (streamed evaluation set)"
        return result
