"""``LayerFoldedModel``: load a folded checkpoint (a save directory or a Hub repo) without the base model.

The checkpoint is what :func:`hf_layerfold.hub.save_folded` writes: ``config.json`` naming ``layerfold_net`` with
the folded structure in ``model_args``, and ``model.safetensors``. Errors name the file at fault.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from .config import LayerFoldingConfig
from .folded_net import FoldedSpecError, LayerFoldedNet, check_pretrained_cfg, shape_mismatches
from .plan import FoldPlan
from .timm_registry import ARCHITECTURE, WEIGHTS_NAME

CONFIG_NAME = "config.json"

logger = logging.getLogger(__name__)


def recorded_config(info: dict, where: str) -> LayerFoldingConfig | None:
    """The ``LayerFoldingConfig`` a save's ``layerfold`` block records, for information (the folded net never uses
    it): fields this version does not know (a newer hf_layerfold's) are dropped with a warning, and a record that
    still does not load is skipped with a warning, never a reason to refuse the model."""
    data = info.get("config")
    if not data:
        return None
    data = _known_fields(data, {f.name for f in dataclasses.fields(LayerFoldingConfig)}, "config", info, where)
    try:
        return LayerFoldingConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        logger.warning("%s: layerfold.config does not load (%s); the model loads without it", where, err)
        return None


def recorded_plan(info: dict, where: str) -> FoldPlan | None:
    """The plan a save's ``layerfold`` block records (information only), or None with a warning when unreadable."""
    if "plan" not in info:
        return None
    data = _known_fields(info["plan"], {"linear_sites"}, "plan", info, where)  # (a newer one's: keep its sites)
    try:
        return FoldPlan.from_dict(data)
    except (TypeError, ValueError) as err:
        logger.warning("%s: layerfold.plan does not load (%s); the model loads without it", where, err)
        return None


def _known_fields(data: Any, known: set[str], record: str, info: dict, where: str) -> Any:
    """``data`` (the ``record`` of a save's ``layerfold`` block) without the fields this version does not know,
    which a newer hf_layerfold wrote: dropped with a warning."""
    unknown = sorted(set(data) - known) if isinstance(data, dict) else []
    if not unknown:
        return data
    logger.warning("%s: layerfold.%s has field(s) %s that this hf_layerfold does not know (the save was written by "
                   "hf_layerfold %s); they are left out of .layerfold_%s", where, record, unknown,
                   info.get("hf_layerfold_version", "another version"), record)
    return {k: v for k, v in data.items() if k in known}


def read_save_info(path: str | os.PathLike) -> dict | None:
    """The ``layerfold`` block (plan, config, stats, provenance) of the folded save in the local folder ``path``, or
    None when ``path`` holds none (not a folder, no ``layerfold_net`` config.json, an unreadable one)."""
    try:
        data = json.loads((Path(path) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("architecture") != ARCHITECTURE:
        return None
    info = data.get("layerfold")
    return info if isinstance(info, dict) else None


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} at {path}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("architecture") != ARCHITECTURE or \
            "features" not in (data.get("model_args") or {}):
        arch = data.get("architecture") if isinstance(data, dict) else None
        raise ValueError(f"{path} describes {arch!r}, not a layer-folded model (architecture {ARCHITECTURE!r} with "
                         "model_args.features): load it with timm.create_model, or fold it first "
                         "(hf_layerfold.fold_model) and save it with hf_layerfold.save_folded")
    return data


def _load_weights(path: Path) -> dict:
    if not path.is_file():
        sharded = path.with_name(path.name.replace(".safetensors", ".safetensors.index.json")).is_file()
        raise FileNotFoundError(f"missing weights file {path}" + (
            " (this folder holds a sharded save: re-save the model in one file, e.g. save_pretrained with a "
            "max_shard_size above its size, or save_folded)" if sharded else ""))
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError / OSError on bad files
        raise ValueError(f"corrupt weights file {path}: {err}") from err


class LayerFoldedModel:
    """The plugin's entry point for folded checkpoints (a namespace; it returns ``LayerFoldedNet`` instances)."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                        token: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, endpoint: str | None = None) -> LayerFoldedNet:
        """Load a folded model from a save directory or a Hub repo (``org/name``, ``hf-hub:``/``local-dir:``
        prefixes accepted), without the base model. The net carries ``.pretrained_cfg`` and ``.layerfold_info``."""
        name = str(path_or_repo_id)
        is_path = isinstance(path_or_repo_id, os.PathLike)  # a Path is a folder, never a repo id
        scheme, _, rest = name.partition(":")
        if scheme in ("hf-hub", "local-dir") and rest:
            name = rest
        local = Path(name).expanduser()
        hub = scheme == "hf-hub" and rest  # said outright: never a local folder of that name
        if not hub and (is_path or scheme == "local-dir" or local.exists() or local.is_absolute()
                        or name.startswith((".", "~"))
                        or name.split("@", 1)[0].count("/") > 1):  # (a revision may hold "/": refs/pr/3)
            if not local.is_dir():
                raise FileNotFoundError(f"{local} is not a directory holding a folded-model save")
            data = _read_config(local / CONFIG_NAME)
            weights = local / WEIGHTS_NAME
            source = {"source": "local-dir", "file": str(local.absolute())}
        else:
            repo_id, _, tag = name.partition("@")
            kw = dict(revision=revision or tag or None, token=token, cache_dir=cache_dir,
                      local_files_only=local_files_only, library_name="hf_layerfold",
                      endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None)
            try:
                data = _read_config(Path(hf_hub_download(repo_id, CONFIG_NAME, **kw)))
            except (RepositoryNotFoundError, HFValidationError, LocalEntryNotFoundError) as err:  # (the last: offline)
                if hub:
                    raise
                why = ("offline, and not in the Hub cache" if isinstance(err, LocalEntryNotFoundError)
                       else type(err).__name__)
                raise FileNotFoundError(f"{name!r} is neither a local directory (none at {local.absolute()}) nor a "
                                        f"Hub repo that can be read ({why})") from err
            try:
                weights = Path(hf_hub_download(repo_id, WEIGHTS_NAME, **kw))
            except EntryNotFoundError:
                raise FileNotFoundError(f"missing weights file {WEIGHTS_NAME} in Hub repo {repo_id}") from None
            source = {"source": "hf-hub", "hf_hub_id": name}
        return cls._build(data, _load_weights(weights), weights, source)

    @staticmethod
    def _build(data: dict, state: dict, weights: Path, source: dict) -> LayerFoldedNet:
        args = dict(data["model_args"])
        info = args.pop("layerfold", None) or data.get("layerfold") or {}
        if not isinstance(info, dict):
            info = {}
        location = source.get("file") or source.get("hf_hub_id")
        where = f"{CONFIG_NAME} of {location}"
        args["num_classes"] = data.get("num_classes", args.get("num_classes", 1000))
        saved_cfg = data.get("pretrained_cfg") or {}
        check_pretrained_cfg(saved_cfg, where)
        try:
            with torch.device("meta"):  # the structure first: nothing allocated until it matches the weights file
                net = LayerFoldedNet(**args, layerfold=info)
        except FoldedSpecError as err:
            raise type(err)(f"{location}: {err}") from None
        own = net.state_dict()
        odd = [f"{k} ({state[k].dtype})" for k, t in own.items() if k in state and t.is_floating_point()
               and not state[k].is_floating_point()]
        if odd:
            raise ValueError(f"weights file {weights} holds non-float tensors for float weights: {odd[:5]}")
        wrong = shape_mismatches(net, {k: tuple(t.shape) for k, t in state.items()})
        if wrong or set(state) - set(own):
            raise ValueError(f"weights file {weights} does not fit the folded structure in config.json of {location}: "
                             f"shapes {wrong[:5]}, unexpected {sorted(set(state) - set(own))[:5]}")
        net = LayerFoldedNet(**args, layerfold=info)  # (built again for real: a registered op's own buffers kept)
        floats = {t.dtype for t in state.values() if t.is_floating_point()}
        if len(floats) == 1:  # the dtype it was saved in (a float64 fold reloads as float64, exactly)
            net.to(floats.pop())
        try:  # (the keys and shapes were compared above)
            net.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"weights file {weights} does not fit the folded structure in config.json: {err}") from err
        except ValueError as err:  # NaN or infinite values, which the net's load_state_dict refuses
            raise ValueError(f"weights file {weights}: {err}") from None
        cfg = {**saved_cfg, **source}  # as timm records it: where the weights came from
        labels = data.get("label_names")
        if labels:
            if not isinstance(labels, list) or len(labels) != net.num_classes:
                raise ValueError(f"config.json of {source.get('file') or source.get('hf_hub_id')} has "
                                 f"{len(labels) if isinstance(labels, list) else repr(labels)} label_names for "
                                 f"{net.num_classes} classes; it must name each class once, in order")
            cfg["label_names"] = labels
        net.pretrained_cfg = net.default_cfg = cfg
        plan, config = recorded_plan(info, where), recorded_config(info, where)
        if plan is not None:
            net.layerfold_plan = plan
        if config is not None:
            net.layerfold_config = config
        return net.eval()

    @staticmethod
    def push_to_hub(model: nn.Module, repo_id: str, *, private: bool = False, token: str | None = None,
                    commit_message: str | None = None, endpoint: str | None = None, revision: str | None = None,
                    create_pr: bool = False, **save_kwargs: Any) -> str:
        """Save ``model`` (see :func:`save_folded`) to a temporary directory and push it; returns the commit URL
        (the pull request's with ``create_pr=True``)."""
        from .hub import check_push_target, push_save, save_folded

        given = sorted({"push_to_hub", "repo_id", "overwrite"} & set(save_kwargs))
        if given:  # save_folded would push (publicly, with its own message) before this push, or save elsewhere
            raise TypeError(f"LayerFoldedModel.push_to_hub takes no {given}: it saves to a temporary folder and "
                            "pushes once, with its own repo_id, private, token and commit_message")

        check_push_target(revision, create_pr)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_folded(model, Path(tmp) / "folded", repo_id=repo_id, **save_kwargs)
            # the card names the repo (not the temporary path) and the branch pushed to
            return push_save(path, repo_id, private=private, token=token, endpoint=endpoint, revision=revision,
                             create_pr=create_pr, commit_message=commit_message)
