"""The trainer's phases and what a checkpoint keeps of them, apart from ``transformers``.

A run is in one of three phases: ``search`` (α learned), ``finetune`` (plan fixed, α frozen at 0/1) or ``folded``
(a ``LayerFoldedNet``: no α, no plan). ``layerfold_state.json`` beside Trainer's checkpoint records the phase, the
plan and the search length, so a resumed run rebuilds the planned network before its weights load and switches
phase at the same step as the run that wrote it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from .config import LAYERFOLD_CONFIG_NAME, LayerFoldingConfig
from .files import write_text_atomic
from .folded_net import LayerFoldedNet
from .plan import FoldPlan, applied_plan, apply_plan

logger = logging.getLogger(__name__)

STATE_NAME = "layerfold_state.json"
SEARCH, FINETUNE, FOLDED = "search", "finetune", "folded"
PHASE_IDS = {SEARCH: 0, FINETUNE: 1, FOLDED: 2}  # logged as numbers: every tracker accepts them


def initial_phase(model: nn.Module) -> str:
    """The phase a model starts training in: folded nets fine-tune as they are, planned models skip the search."""
    if isinstance(model, LayerFoldedNet):
        return FOLDED
    return FINETUNE if applied_plan(model) is not None else SEARCH


def resolve_search_steps(config: LayerFoldingConfig, phase: str, resumed: int | None, *, sized: bool,
                         steps_per_epoch: int, max_steps: int) -> int:
    """Optimizer steps of the search phase: ``search_steps``, else ``search_epochs``, else half of training.

    A resumed run keeps its checkpoint's length (``resumed``), so the plan is fixed at the same step.
    """
    if phase in (FINETUNE, FOLDED):  # the search is over (or there was none): its length is only a record
        return 0 if resumed is None else resumed
    if config.search_steps is not None:
        steps = int(config.search_steps)
    elif config.search_epochs is not None:
        if not sized:
            raise ValueError("search_epochs needs a training set with a length; set search_steps instead "
                             "(e.g. for a streaming dataset)")
        steps = int(round(config.search_epochs * steps_per_epoch))
        if steps == 0 and config.search_epochs > 0:
            logger.warning("search_epochs=%s is less than half an optimizer step (%d per epoch): no search; the "
                           "plan is fixed before the first step", config.search_epochs, steps_per_epoch)
    else:
        steps = max_steps // 2
    if resumed is not None:
        if resumed != steps:
            logger.warning("the checkpoint's search length (%d steps) differs from the current settings (%d); "
                           "keeping the checkpoint's", resumed, steps)
        steps = resumed
    if steps >= max_steps and phase == SEARCH:
        logger.warning("search phase (%d steps) covers all %d training steps: no fine-tune phase", steps, max_steps)
    return steps


@dataclass(frozen=True)
class PhaseState:
    """What ``layerfold_state.json`` holds."""

    phase: str
    search_steps: int | None
    global_step: int
    plan: FoldPlan | None

    def write(self, directory: str | os.PathLike, config: LayerFoldingConfig) -> None:
        """Write the state (atomically) and the config beside a checkpoint."""
        state = {"phase": self.phase, "search_steps": self.search_steps, "global_step": self.global_step,
                 "plan": None if self.plan is None else self.plan.to_dict()}
        write_text_atomic(Path(directory) / STATE_NAME, json.dumps(state, indent=2) + "\n")
        config.save_pretrained(directory)

    @classmethod
    def read(cls, checkpoint: str | os.PathLike) -> PhaseState | None:
        """The checkpoint's state, or ``None`` when it has none (a plain Trainer checkpoint)."""
        path = Path(checkpoint) / STATE_NAME
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            if state.get("phase") not in PHASE_IDS:
                raise ValueError(f"phase {state.get('phase')!r} is none of {sorted(PHASE_IDS)}")
            if state["phase"] == FINETUNE and state.get("plan") is None:
                raise ValueError("a fine-tune phase without its plan")
            search_steps = state.get("search_steps")
            if search_steps is not None and (isinstance(search_steps, bool) or not isinstance(search_steps, int)
                                             or search_steps < 0):
                raise ValueError(f"search_steps {search_steps!r} is not a whole number >= 0")
            plan = state.get("plan")
            return cls(phase=state["phase"], search_steps=search_steps,
                       global_step=int(state.get("global_step") or 0),
                       plan=None if plan is None else FoldPlan.from_dict(plan))
        except (ValueError, TypeError) as err:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            raise ValueError(f"cannot resume from {checkpoint}: its {STATE_NAME} is not readable ({err}); it is "
                             "what LayerFoldingTrainer writes beside each checkpoint") from None


# Fields a resumed run may change: the search length is the checkpoint's anyway (see resolve_search_steps), α starts
# from the checkpoint's values, and the blend backend computes the same function.
RESUME_MAY_DIFFER = frozenset({"search_steps", "search_epochs", "alpha_init", "blend"})


def check_resumed_config(checkpoint: str | os.PathLike, config: LayerFoldingConfig) -> None:
    """Refuse to resume a run under another ``LayerFoldingConfig`` than the one its checkpoint records: other sites
    fail to load (or load half), and other knobs (λ, threshold, ...) silently make another run."""
    path = Path(checkpoint) / LAYERFOLD_CONFIG_NAME
    if not path.is_file():
        return
    # both through the dataclass: a field added since the checkpoint was written takes its default, and validate()
    # normalises representations (a tuple, a pattern string, a weights file)
    try:
        saved = json.loads(LayerFoldingConfig.from_pretrained(path).to_json_string())
    except (ValueError, OSError) as err:  # a newer version's field, a value no longer valid, a weights file gone
        raise ValueError(f"cannot resume from {checkpoint}: its {LAYERFOLD_CONFIG_NAME} does not load ({err})") from err
    current = json.loads(config.to_json_string())
    differ = sorted(name for name in current if name not in RESUME_MAY_DIFFER and saved[name] != current[name])
    if differ:
        pairs = "; ".join(f"{name}: {saved[name]!r} there, {current[name]!r} here" for name in differ)
        raise ValueError(f"{checkpoint} was trained with another LayerFoldingConfig ({pairs}). To continue that "
                         "run, build the trainer with layerfold_config=LayerFoldingConfig.from_pretrained("
                         f"{str(checkpoint)!r}) (a plain model is prepared with it); to train differently, start a new "
                         "run from its weights instead of resuming.")


def restore_phase(checkpoint: str | os.PathLike, model: nn.Module, phase: str,
                  config: LayerFoldingConfig) -> tuple[str, int | None]:
    """Bring ``model`` to the checkpoint's phase before its weights load: ``(phase, resumed search steps)``.

    A fine-tune checkpoint re-applies its plan (the planned model has the same state-dict keys); a checkpoint
    from another kind of run, a model planned differently, or another config (:func:`check_resumed_config`) is
    refused instead of silently mixed.
    """
    state = PhaseState.read(checkpoint)
    if state is None:
        logger.warning("%s has no %s: resuming in the %s phase", checkpoint, STATE_NAME, phase)
        return phase, None
    if FOLDED in (phase, state.phase):  # nothing to restore but the kind of run must match
        if phase != state.phase:
            raise ValueError(f"{checkpoint} is from a {state.phase!r} run; resume it into the same kind of model "
                             f"(this one is in the {phase!r} phase)")
        check_resumed_config(checkpoint, config)
        return phase, None
    current = applied_plan(model)
    if state.phase == FINETUNE:
        if current is not None and current != state.plan:
            raise ValueError(f"the model already has a different plan than {checkpoint}; resume into a fresh "
                             "(prepared, unplanned) model")
        check_resumed_config(checkpoint, config)
        apply_plan(model, state.plan, config)
        return FINETUNE, state.search_steps
    if current is not None:
        raise ValueError(f"{checkpoint} is from the search phase but the model already has a plan (fixed after that "
                         "checkpoint was written, e.g. by an interrupted train() of this same trainer, which plans the "
                         "model in place); build a new LayerFoldingTrainer around a fresh (plain or prepared, "
                         "unplanned) model to resume from it")
    check_resumed_config(checkpoint, config)
    return SEARCH, state.search_steps
