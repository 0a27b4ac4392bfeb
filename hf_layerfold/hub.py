"""Save and push folded models: a timm-native checkpoint that needs neither the base model nor its weights.

A save holds ``model.safetensors``, a timm ``config.json`` (architecture ``layerfold_net``, the folded
structure in ``model_args``, a ``layerfold`` block with the plan, config and measured stats),
``layerfold_config.json``, ``layerfold_plan.json`` and the model card ``README.md``. It loads with
``timm.create_model("hf-hub:…" | "local-dir:…", pretrained=True)``, transformers' ``TimmWrapper``
(``AutoModelForImageClassification``, ``pipeline``) and :meth:`LayerFoldedModel.from_pretrained`,
after ``import hf_layerfold`` (which registers ``layerfold_net`` with timm).
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import numbers
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.fx
import torch.nn as nn
from huggingface_hub import HfApi
from timm.data import resolve_data_config
from timm.models import PretrainedCfg

from .activation import FoldableActivation
from .collate import drop_test_size, fit_channels, pretrained_cfg_of
from .config import LAYERFOLD_CONFIG_NAME, LayerFoldingConfig, as_config
from .fold import WEIGHT_PROVENANCE_KEYS, WEIGHT_SOURCE_KEYS, fold_model, folded_layout_cfg
from .folded_model import CONFIG_NAME, LayerFoldedModel, read_save_info
from .folded_net import FORMAT_VERSION, LayerFoldedNet, registered_kinds
from .layers import PaddedConv2d
from .model_card import (
    accuracy_section,
    eval_results_from,
    fold_rows,
    latency_section,
    point_card_at,
    render_card,
    split_hub_ref,
)
from .plan import (
    PLAN_NAME,
    FoldPlan,
    applied_plan,
    apply_plan,
    follow_applied_config,
    iter_runs,
    run_pad_rules,
    segment_model,
    threshold_plan,
)
from .prepare import is_prepared
from .stats import FoldStats, fold_stats
from .timm_registry import ARCHITECTURE, WEIGHTS_NAME

__all__ = ["LayerFoldedModel", "PushToHubError", "is_folded_save", "push_save", "save_folded"]

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
DEFAULT_COMMIT_MESSAGE = "Upload layer-folded model (hf_layerfold)"
CARD_FIELDS = ("stats_before", "latency", "accuracy", "datasets", "license", "tags", "language", "model_name",
               "template", "plan_searched")


class PushToHubError(RuntimeError):
    """The push failed; ``save_directory`` (when set) still holds the complete local save."""

    def __init__(self, message: str, repo_id: str, save_directory: Path | None) -> None:
        super().__init__(message)
        self.repo_id, self.save_directory = repo_id, save_directory


# ----------------------------------------------------------------------------------------------------------
# Saving


def is_folded_save(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`save_folded` (a ``layerfold_net`` config.json)."""
    return read_save_info(path) is not None


# What an OS adds to a folder it shows, and what `hf download --local-dir` adds beside a save: not the user's work
_INCIDENTAL = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".gitattributes", ".cache",
                         "lost+found"})  # (the root of a mounted ext4 volume, kept by a file-by-file save)


SAVE_FILES = (WEIGHTS_NAME, CONFIG_NAME, LAYERFOLD_CONFIG_NAME, PLAN_NAME, CARD_NAME)  # what a save writes
_INNER_TMP = ".layerfold-tmp-"  # the folder a file-by-file save writes inside the target


def foreign_entries(path: str | os.PathLike) -> list[str]:
    """Names in a folded save's directory that :func:`save_folded` does not write (a user's notes, a ``.git``):
    replacing the save would delete them. Files an OS or a Hub download leaves there do not count."""
    own = set(SAVE_FILES) | _INCIDENTAL
    return sorted(e.name for e in Path(path).iterdir() if e.name not in own and not e.name.startswith("._")
                  and not e.name.startswith(_INNER_TMP))  # (a killed file-by-file save's folder: deleted on save)


def check_not_working_directory(target: Path) -> None:
    """A save swaps its folder in by renames: never the working directory or one above it."""
    cwd, resolved = Path.cwd().resolve(), Path(target).resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise FileExistsError(f"{target} is the current directory or one above it; save into a directory of its own")


def check_repo_id(repo_id: str, name: str = "repo_id") -> None:
    """A malformed Hub repo id (``name`` is the argument that gave it) fails before any work, not at upload."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{name} {repo_id!r} is not a valid Hub repo id (org/name): {err}") from None
    if "/" not in repo_id:  # the Hub would put it under the token's user, and the card's snippets would not resolve
        raise ValueError(f"{name} {repo_id!r} has no namespace: give it as org/name (your user or organization name "
                         "first), which the model card's loading snippets then name")


def check_save_target(save_directory: str | os.PathLike, *, overwrite: bool = False,
                      beside: Sequence[str | os.PathLike] = (), replace_hint: str = "pass overwrite=True") -> Path:
    """Refuse, before any work, what :func:`save_folded` would refuse at its end (a script calls this before
    training, so a long run is not lost to a bad ``--folded_dir``). ``beside``: directories the run writes itself
    (Trainer's ``output_dir``): the save may go inside one, never be one or above one, which its checkpoints would
    fill before the save. ``replace_hint``: how the caller's user replaces a directory (a script without an
    overwrite flag says so). Returns the directory the save will write (a symbolic link followed)."""
    target = _followed(Path(save_directory).expanduser().absolute())
    for other in beside:
        other = Path(other).expanduser().absolute().resolve()
        if target.resolve() == other or target.resolve() in other.parents:
            raise FileExistsError(f"the folded model's directory {save_directory} is {other} or one above it, where "
                                  "the run writes its checkpoints; save it into a directory of its own (e.g. "
                                  f"{other / 'folded'})")
    _check_target(target, overwrite, replace_hint)
    return target


def _check_target(target: Path, overwrite: bool, hint: str = "pass overwrite=True") -> None:
    check_not_working_directory(target)
    above = next((p for p in target.parents if p.exists()), target)
    if not above.is_dir():
        raise NotADirectoryError(f"cannot save into {target}: {above} is a file, not a directory")
    if overwrite or not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; {hint} to replace it")
    if not os.access(target, os.W_OK):  # (the exchange would succeed, but the old save could not be deleted)
        raise PermissionError(f"{target} is read-only; make it writable to save into it, or save "
                              "elsewhere")
    if any(e.name not in _INCIDENTAL for e in target.iterdir()) and not is_folded_save(target):
        raise FileExistsError(f"{target} is a non-empty directory that is not a folded-model save; refusing to "
                              f"replace it ({hint} to replace the whole directory)")
    extra = foreign_entries(target)
    if extra:
        raise FileExistsError(f"{target} holds a folded save and also {extra}, which a save does not write; refusing "
                              f"to replace it ({hint} to replace the whole directory, those included)")


def _followed(target: Path) -> Path:
    """Where a save to ``target`` goes: a symbolic link to a directory (an output folder kept on another disk) is
    followed, so the save lands there and the link stays; the swap renames happen beside the real folder. A
    dangling link is left as given (refused by ``_check_target`` unless ``overwrite``)."""
    if target.is_symlink() and target.is_dir():
        return target.resolve()
    return target


def _sync_files(folder: Path) -> None:
    """Flush every file of the new save to disk before it replaces the old one: after a crash a swapped folder
    holds either the old save or the whole new one, never a renamed folder of unwritten files."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _swap_in(tmp: Path, target: Path) -> None:
    """Move the finished save into place. Where the OS can exchange two paths in one step (Linux ``renameat2``), a
    reader sees the old save or the new one, never none; elsewhere the old one is renamed away first and deleted
    only once the new is in."""
    if not (target.exists() or target.is_symlink()):
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):  # tmp now holds the old save
        _remove(tmp)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where that is not available
    (another OS, an old kernel or C library, a file system without it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    if path.exists() or path.is_symlink():  # (a read-only folder's files): say so, or it stays hidden for ever
        logger.warning("could not delete %s, the save it replaced; delete it yourself", path)


def _swaps_beside(target: Path) -> bool:
    """Whether the save can be written beside ``target`` and swapped in by renames: not when ``target`` is a mount
    point (a volume mounted at the output folder: renaming it fails with EBUSY) or its parent is not writable
    (a folder made for the user in a shared one); the files are then replaced inside it, one rename each."""
    if not target.is_dir():
        return True
    return not os.path.ismount(target) and os.access(target.parent, os.W_OK)


def _replace_files(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the new save's files (in ``tmp``, a folder inside ``target``) over the old ones, each in one rename,
    and delete the files of the previous save the new one lacks (with ``overwrite``, everything else too)."""
    written = sorted((p.name for p in tmp.iterdir()), key=lambda name: name == CONFIG_NAME)  # config.json last
    for name in written:
        os.replace(tmp / name, target / name)
    for entry in target.iterdir():
        if entry != tmp and entry.name not in written and entry.name != "lost+found" and (
                overwrite or entry.name in SAVE_FILES or entry.name.startswith(_INNER_TMP)):
            _remove(entry)


def _base_copy(planned: nn.Module) -> nn.Module:
    """The network before folding (original activations and padding), rebuilt from a prepared/planned model."""
    base = copy.deepcopy(planned)
    plan = applied_plan(base)
    if plan is not None:  # undo apply_plan's padding move: each conv of a merged run gets its own rule back
        seg = segment_model(base, plan)
        for run in [*iter_runs(seg.items), *iter_runs(seg.pre_logits)]:
            if len(run.convs) > 1:
                for node, rule in zip(run.convs, run_pad_rules(base, run)):
                    base.set_submodule(node.conv, PaddedConv2d.from_conv(base.get_submodule(node.conv), [rule]))
    for name, module in list(base.named_modules()):
        if isinstance(module, FoldableActivation):
            base.set_submodule(name, module.act)
    return base


def _fold(model: nn.Module) -> tuple[LayerFoldedNet, nn.Module | None]:
    """(folded net, planned source model or None) for a LayerFoldedNet, a prepared/planned or a plain timm model."""
    model = getattr(model, "timm_model", model)  # a transformers TimmWrapper
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the same parameters
    if isinstance(model, LayerFoldedNet):
        _check_float_weights(model)
        return model, None
    if isinstance(model, torch.fx.GraphModule):  # (fold_model would call it an unsupported model family)
        raise TypeError("save_folded got a torch.fx GraphModule (FX quantization, feature extraction or "
                        "symbolic_trace output): save the LayerFoldedNet it was made from, and redo the conversion "
                        "after loading it back")
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_folded needs a LayerFoldedNet or a prepared/planned timm model, got {type(model)}")
    if is_prepared(model) and applied_plan(model) is None:
        model = apply_plan(copy.deepcopy(model), threshold_plan(model, "save_folded"))
    return fold_model(model), model


def _check_float_weights(net: LayerFoldedNet) -> None:
    """A save holds float tensors; a net converted by torch.ao.quantization keeps packed params (and dtypes) in its
    state dict instead, which safetensors cannot write."""
    odd = [k for k, v in net.state_dict().items() if not isinstance(v, torch.Tensor) or v.is_quantized]
    if odd:
        raise ValueError(f"save_folded writes float weights, but this folded net holds quantized or packed state "
                         f"({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''}; torch.ao.quantization output): save "
                         "the folded net before quantizing it, and quantize it again after loading it back")


def _label_list(label_names: Any, num_classes: int) -> list[str] | None:
    if label_names is None:
        return None
    if isinstance(label_names, str | bytes):
        raise TypeError(f"label_names must be a list of class names or a dict of id -> name, got the string "
                        f"{label_names!r}")
    if isinstance(label_names, Mapping):
        ids = sorted(int(k) for k in label_names)
        if ids != list(range(num_classes)):
            raise ValueError(f"label_names must name every class id 0..{num_classes - 1}, got ids {ids}")
        return [str(label_names[k] if k in label_names else label_names[str(k)]) for k in ids]
    names = [str(n) for n in label_names]
    if len(names) != num_classes:
        raise ValueError(f"label_names has {len(names)} names for a {num_classes}-class model")
    return names


def _export_cfg(net: LayerFoldedNet, overlay: Mapping | None, labels: list[str] | None,
                source: Mapping) -> tuple[dict, list | None]:
    """A loadable pretrained_cfg (no weight source of the base model) and the label names to write at the root;
    ``source``: the model's pretrained_cfg (:func:`~hf_layerfold.collate.pretrained_cfg_of`)."""
    source = dict(source)
    if labels is None and source.get("label_names") and len(source["label_names"]) == net.num_classes:
        labels = list(source["label_names"])
    cfg = {k: v for k, v in source.items() if k in PretrainedCfg.__dataclass_fields__
           and k not in WEIGHT_SOURCE_KEYS + WEIGHT_PROVENANCE_KEYS}
    cfg.update(overlay or {})  # (which may describe the saved weights)
    if not cfg.get("input_size"):  # (a custom model family without timm's pretrained_cfg)
        raise ValueError("the model has no pretrained_cfg to record its preprocessing from: pass "
                         "pretrained_cfg_overlay={'input_size': (3, H, W), 'mean': (...), 'std': (...)}")
    if "input_size" in (overlay or {}):
        drop_test_size(cfg, keep=overlay)
    cfg.update(resolve_data_config({}, pretrained_cfg=cfg))  # input size, interpolation, mean, std, crop
    cfg = fit_channels(net, cfg, (overlay or {}).get("input_size"))  # an in_chans=1 model: one channel
    if net.num_classes != source.get("num_classes"):
        cfg.pop("label_descriptions", None)
    cfg.update(folded_layout_cfg(net), custom_load=False, label_names=None)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if v is not None}
    return cfg, labels


def _check_overlay(overlay: Mapping | None) -> None:
    """Only preprocessing fields timm's ``PretrainedCfg`` knows (a typo'd key made a save timm could not load, the
    error blaming the weights); no weight source (these weights are the save's own); labels through
    ``label_names``."""
    if not overlay:
        return
    known = set(PretrainedCfg.__dataclass_fields__) - set(WEIGHT_SOURCE_KEYS) - {"label_names", "num_classes",
                                                                           "architecture"}
    if "label_names" in overlay:
        raise ValueError("pretrained_cfg_overlay: pass class names as save_folded(label_names=...)")
    unknown = sorted(set(overlay) - known)
    if unknown:
        raise ValueError(f"pretrained_cfg_overlay has key(s) {unknown} that a save cannot record (a weight source, "
                         f"the class count, or a field timm's PretrainedCfg does not have); known: {sorted(known)}")
    for key in ("mean", "std"):
        value = overlay.get(key)
        if value is not None and (isinstance(value, str) or not isinstance(value, Sequence)
                                  or not all(isinstance(v, numbers.Real) for v in value)):
            raise ValueError(f"pretrained_cfg_overlay[{key!r}] must give one number per input channel, e.g. "
                             f"(0.5, 0.5, 0.5); got {value!r}")


def _base_model_ref(base_model: str) -> str | None:
    """``org/name`` or ``org/name@revision`` (an ``hf-hub:`` prefix dropped) for a Hub id, None for a timm
    architecture name; anything else that looks like a Hub reference is refused (it would be dropped silently)."""
    repo, revision = split_hub_ref(base_model)
    if repo is not None:
        check_repo_id(repo, "base_model")
        return repo + (f"@{revision}" if revision else "")
    if re.fullmatch(r"[\w.-]+", base_model) and base_model.strip("."):
        return None
    raise ValueError(f"base_model {base_model!r} is neither a Hub repo id ('org/name', optionally '@revision') nor "
                     "a timm architecture name")


def _stats_dict(stats: FoldStats | Mapping | None) -> dict | None:
    if stats is None:
        return None
    return stats.to_dict() if isinstance(stats, FoldStats) else {k: v for k, v in dict(stats).items()
                                                                 if v is not None}


def _layerfold_block(net: LayerFoldedNet, planned: nn.Module | None, config: Any, base_model: str | None,
                     input_size: Sequence[int], stats_before: Any) -> dict:
    from . import __version__

    info = dict(net.layerfold_info or {})
    plan = applied_plan(planned) if planned is not None else None
    if plan is None:  # (an empty FoldPlan is falsy but is a plan: `or` would look past it)
        plan = getattr(net, "layerfold_plan", None)
    if plan is None:
        from .folded_model import recorded_plan

        plan = recorded_plan({"plan": info.get("plan") or {}}, "the folded net's layerfold_info")
        if plan is None:  # (an empty plan would be a false record: the card would say nothing was removed)
            raise ValueError("save_folded: the folded net's layerfold_info records a plan this hf_layerfold cannot "
                             "read; set net.layerfold_plan (a FoldPlan) before saving it again")
    if config is None and planned is not None:
        config = getattr(planned, "layerfold_config", None)
    if config is None:  # (a record this version cannot read, a newer one's, is dropped with a warning)
        from .folded_model import recorded_config

        config = recorded_config(info, "the folded net's layerfold_info")
    if config is not None:  # (a mapping is validated); the fold fields its plan was applied with, recorded
        config = as_config(config)
        if planned is not None:
            config = follow_applied_config(planned, config, "save_folded")
        config = config.to_dict()
    after = fold_stats(net, tuple(input_size)).to_dict()
    counted_at = getattr(stats_before, "input_size", None)
    if counted_at is not None and stats_before.macs is not None and tuple(counted_at) != tuple(input_size):
        raise ValueError(f"stats_before counted MACs at {tuple(counted_at)}, but this save records and counts the "
                         f"folded model at {tuple(input_size)}: the card would compare the two; count them with "
                         f"fold_stats(model, {tuple(input_size)})")
    before = _stats_dict(stats_before)
    if before is None and planned is not None:
        before = fold_stats(_base_copy(planned), tuple(input_size)).to_dict()
    if (before is None and list(info.get("stats_input_size") or []) == list(input_size)
            and info.get("stats_after") == after):  # (a net changed since, e.g. a new head: not comparable)
        before = info.get("stats_before")
    base_arch = (planned.pretrained_cfg.get("architecture") if planned is not None and
                 getattr(planned, "pretrained_cfg", None) else info.get("base_architecture"))
    if base_model is not None:
        ref = _base_model_ref(base_model)
        if ref is None:  # an architecture name, not a Hub repo id
            base_arch = base_arch or base_model
        base_model = ref
    block = {"format_version": FORMAT_VERSION, "hf_layerfold_version": __version__,
             "base_architecture": base_arch, "base_model": base_model or info.get("base_model"),
             "plan": plan.to_dict(), "config": config, "stats_input_size": list(input_size), "stats_before": before,
             "stats_after": after,
             "folds": info.get("folds") or (fold_rows(planned, net) if planned is not None and is_prepared(planned)
                                            else None)}  # (fold_model recorded them: not segmented again)
    return {k: v for k, v in block.items() if v is not None}


def save_folded(model: nn.Module, save_directory: str | os.PathLike, *, push_to_hub: bool = False,
                repo_id: str | None = None, private: bool = False, token: str | None = None,
                commit_message: str | None = None, overwrite: bool = False,
                config: LayerFoldingConfig | Mapping | None = None, base_model: str | None = None,
                eval_results: Any = None, label_names: Sequence[str] | Mapping | None = None,
                pretrained_cfg_overlay: Mapping | None = None, endpoint: str | None = None,
                revision: str | None = None, create_pr: bool = False, **card_fields: Any) -> Path:
    """Fold (if needed) and save ``model`` as a loadable timm checkpoint with its model card; optionally push it.

    Args:
        model: a ``LayerFoldedNet``, or a prepared (plan = sites whose α reached the threshold) or planned model.
        save_directory: written atomically (a temporary directory next to it, then renamed; a symbolic link to
            a directory is followed and kept), except where the directory cannot be renamed (a mount point, or
            a parent you cannot write): its files are then replaced one by one, and an interrupted save can
            leave a mix of the old and new files. A previous save there is replaced; any other non-empty directory,
            a previous save among other files included, is refused unless ``overwrite=True`` (which replaces the
            whole directory).
        push_to_hub / repo_id / private / token / commit_message / endpoint: one ``upload_folder`` commit to
            ``repo_id`` (created if missing) on ``endpoint`` (default: ``HF_ENDPOINT``, else huggingface.co).
            The card's loading snippets name ``repo_id`` when given (even without a push), else the local path.
        revision / create_pr: the branch to commit to (created from the default branch if missing; an open pull
            request's ``refs/pr/N`` takes the commit as it is; the card's snippets load that branch), or open a pull
            request against the default branch instead of committing (the two do not combine). The commit's or
            the pull request's address is logged (``hf_layerfold.hub``, level INFO).
        config: the ``LayerFoldingConfig`` used (default: the model's).
        base_model: Hub id (``org/name``, or ``org/name@revision``: the metadata takes the repo id, the card text
            names the revision) of the model that was folded, for the card's ``base_model`` metadata; a bare
            architecture name is recorded as the base architecture only.
        license: the card's license (default: the model's ``pretrained_cfg`` license, which timm records for its
            weights; ``False`` for none, e.g. a model trained from random weights, to which timm gives the same
            pretrained cfg).
        eval_results: measured results for the card's ``model-index`` (``EvalResult`` objects or dicts, see
            ``model_card.eval_results_from``).
        label_names: class names (default: the source model's, when their count matches).
        pretrained_cfg_overlay: preprocessing to record, e.g. ``{"input_size": (3, 64, 64), "mean": ...}``.
        **card_fields: ``stats_before`` (FoldStats/dict, when ``model`` is already folded), ``latency``
            (``before_ms``/``after_ms``, ``device``, ``batch_size``, ``dtype``), ``accuracy`` (``before``/``after``
            fractions, ``split``, ``dataset``), ``datasets``, ``license``, ``tags``, ``language``,
            ``model_name``, ``template`` (a Jinja card template path), ``plan_searched`` (``True``: the plan came
            from the α search, ``False``: it was fixed before training; unset: the card says either).

    Returns:
        The save directory.
    """
    if push_to_hub and not repo_id:
        raise ValueError("push_to_hub=True needs repo_id (e.g. 'your-org/mobilenetv2-folded')")
    if push_to_hub:
        check_repo_id(repo_id)
    if (revision is not None or create_pr) and not push_to_hub:
        raise ValueError("revision= and create_pr= are push settings: pass them with push_to_hub=True")
    check_push_target(revision, create_pr)
    unknown = sorted(set(card_fields) - set(CARD_FIELDS))
    if unknown:
        raise TypeError(f"save_folded got unknown argument(s) {unknown}; card fields: {list(CARD_FIELDS)}")
    given = Path(save_directory).expanduser().absolute()
    target = check_save_target(given, overwrite=overwrite)
    if base_model is not None:
        _base_model_ref(base_model)  # validate card inputs before any work
    latency_section(card_fields.get("latency"))
    accuracy_section(card_fields.get("accuracy"))
    eval_results_from(eval_results)
    _check_overlay(pretrained_cfg_overlay)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError("the model's weights are on the meta device (no values): load them (e.g. model.to_empty("
                         "device='cpu') then load_state_dict) before saving it")

    net, planned = _fold(model)
    source_cfg = pretrained_cfg_of(model)  # (a transformers wrapper's checkpoint config, else the model's own)
    labels = _label_list(label_names, net.num_classes)
    pretrained_cfg, labels = _export_cfg(net, pretrained_cfg_overlay, labels, source_cfg)
    block = _layerfold_block(net, planned, config, base_model, pretrained_cfg["input_size"],
                             card_fields.get("stats_before"))
    license = card_fields.get("license")
    if license is None:
        license = source_cfg.get("license")
    pretrained_cfg.pop("license", None)  # the license of these weights (False: none)
    if license:
        pretrained_cfg["license"] = license
    model_args = {k: v for k, v in net.model_args.items() if k != "num_classes"}  # transformers passes num_classes
    hf_config = {"architecture": ARCHITECTURE, "num_classes": net.num_classes, "num_features": net.num_features,
                 "global_pool": net.model_args["global_pool"], **({"label_names": labels} if labels else {}),
                 "model_args": {**model_args, "layerfold": block}, "pretrained_cfg": pretrained_cfg,
                 "layerfold": block}
    card = render_card(block, load_id=repo_id or str(given), is_hub=bool(repo_id),
                       title=card_fields.get("model_name") or (repo_id or target.name).split("/")[-1],
                       base_model=block.get("base_model"), datasets=card_fields.get("datasets"),
                       license=license or None,
                       eval_results=eval_results, latency=card_fields.get("latency"),
                       accuracy=card_fields.get("accuracy"), tags=card_fields.get("tags") or (),
                       language=card_fields.get("language"), template=card_fields.get("template"),
                       plan_searched=card_fields.get("plan_searched"),
                       custom_ops=registered_kinds([*net.model_args["features"], *net.model_args["pre_logits"]]),
                       load_revision=revision if push_to_hub and not create_pr else None,  # (a PR merges to main)
                       num_classes=net.num_classes)

    beside = _swaps_beside(target)
    if beside:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    else:
        tmp = target / f"{_INNER_TMP}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
        (tmp / WEIGHTS_NAME).write_bytes(safetensors.torch.save(state, metadata={"format": "pt"}))
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
        if block.get("config"):
            LayerFoldingConfig.from_dict(block["config"]).save_pretrained(tmp)
        FoldPlan.from_dict(block["plan"]).save(tmp)
        card.save(tmp / CARD_NAME)
        _sync_files(tmp)
        if beside:
            _swap_in(tmp, target)
        else:
            _replace_files(tmp, target, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if push_to_hub:
        url = _push(target, repo_id, private=private, token=token, endpoint=endpoint, revision=revision,
                    create_pr=create_pr, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE)
        logger.info("pushed %s to %s", target, url)
    return given


# Files another model left in a repo that transformers would read instead of what config.json records: an image
# processor config makes AutoImageProcessor / pipeline preprocess with the previous model's size, mean and std.
STALE_LOADER_FILES = ("preprocessor_config.json", "processor_config.json")


def check_push_target(revision: str | None, create_pr: bool) -> None:
    """huggingface_hub opens a pull request against the default branch only: refuse a branch with it up front."""
    if create_pr and revision not in (None, "main"):
        raise ValueError(f"create_pr=True opens a pull request against the default branch; it cannot target "
                         f"revision={revision!r} (push to the branch without create_pr, or leave revision unset)")


def push_save(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None,
              endpoint: str | None = None, commit_message: str | None = None, revision: str | None = None,
              create_pr: bool = False) -> str:
    """Push an existing save: only its own files (staged in a temporary folder), its card's loading snippets
    pointed at ``repo_id`` and ``revision`` (a pull request merges into the default branch: its card loads that).
    Shared by :meth:`LayerFoldedModel.push_to_hub` and ``hf-layerfold push``; returns the commit or PR URL."""
    check_push_target(revision, create_pr)
    with tempfile.TemporaryDirectory(prefix=".hf-layerfold-push-") as tmp:
        staged = Path(tmp) / "save"  # (not the folder's name: `push ..` named the temporary folder's parent)
        staged.mkdir()
        for name in SAVE_FILES:
            if (Path(folder) / name).is_file():
                shutil.copy2(Path(folder) / name, staged / name)
        card = staged / CARD_NAME
        if card.is_file():
            card.write_text(point_card_at(card.read_text(), repo_id, None if create_pr else revision))
        return _push(staged, repo_id, private=private, token=token, endpoint=endpoint, keep_note=False,
                     revision=revision, create_pr=create_pr, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE)


def _push(directory: Path, repo_id: str, *, private: bool, token: str | None, endpoint: str | None,
          commit_message: str, keep_note: bool = True, revision: str | None = None, create_pr: bool = False) -> str:
    """``create_repo(exist_ok=True)`` + one ``upload_folder`` commit (to ``revision``, created if missing, or as a
    pull request); returns the commit URL, or the pull request's."""
    from . import __version__

    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token,
                library_name="hf_layerfold", library_version=__version__)
    present = [name for name in SAVE_FILES if (directory / name).is_file()]
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and not create_pr and not revision.startswith("refs/pr/"):
            # (an open pull request's refs/pr/N takes commits, but the Hub refuses to create a branch of that
            # name: "Bad request: Invalid reference for a branch", as transformers' push_to_hub found)
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        # only the save's own files; and one a previous push left (a folded net has no layerfold_config.json)
        # is deleted, or the repo would hold a file its config.json contradicts; so is another model's image
        # processor config, which transformers would preprocess with instead of the saved pretrained_cfg
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=directory, commit_message=commit_message,
                                   allow_patterns=present, revision=None if create_pr else revision,
                                   create_pr=create_pr or None,
                                   delete_patterns=[*(n for n in SAVE_FILES if n not in present),
                                                    *STALE_LOADER_FILES])
    except Exception as err:
        where = f"; the local save is intact at {directory}" if keep_note else ""
        raise PushToHubError(f"pushing the folded model to {repo_id!r} failed ({type(err).__name__}: {err}){where}",
                             repo_id, directory if keep_note else None) from err
    if create_pr and not commit.pr_url:  # (huggingface_hub skips an empty commit, and opens no pull request)
        logger.warning("no pull request opened on %s: the save's files are those of its default branch already",
                       repo_id)
    return commit.pr_url or commit.commit_url
