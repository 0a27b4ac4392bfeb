"""Registers the ``layerfold_net`` architecture with timm (runs on ``import hf_layerfold``).

A folded checkpoint's ``config.json`` names ``layerfold_net`` and carries the folded structure in ``model_args``,
so ``timm.create_model("hf-hub:org/name", pretrained=True)``, ``"local-dir:/path"`` and transformers'
``TimmWrapper`` rebuild it from the spec alone: no base model, no base weights. timm has no plugin discovery,
so the registration happens when ``hf_layerfold`` is imported: ``import hf_layerfold`` before loading.
"""

from __future__ import annotations

import os
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .folded_net import FoldedSpecError, LayerFoldedNet, check_pretrained_cfg, shape_mismatches

ARCHITECTURE = "layerfold_net"
WEIGHTS_NAME = "model.safetensors"

# No weights of its own: every checkpoint brings its own pretrained_cfg (input size, mean, std, labels).
default_cfgs = generate_default_cfgs({
    ARCHITECTURE: dict(num_classes=1000, input_size=(3, 224, 224), first_conv="features.0", classifier="classifier",
                       description="A layer-folded CNN (hf_layerfold); load a saved one by hf-hub: or local-dir:"),
})


def _weights_location(pretrained_cfg: Any) -> str:
    cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, "__dict__", {})
    if cfg.get("source") == "hf-hub" and cfg.get("hf_hub_id"):
        return f"{WEIGHTS_NAME} of Hub repo {cfg['hf_hub_id']}"
    if cfg.get("file"):
        return f"{cfg['file']}/{WEIGHTS_NAME}"
    return "the checkpoint named by pretrained_cfg"


def _saved_weights(pretrained_cfg: Any) -> str | None:
    """The local weights file timm is about to read (a local-dir save, or a Hub save already in the cache)."""
    cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, "__dict__", {})
    if cfg.get("source") == "local-dir" and cfg.get("file"):
        path = os.path.join(cfg["file"], WEIGHTS_NAME)
        return path if os.path.isfile(path) else None
    if cfg.get("source") == "hf-hub" and cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = str(cfg["hf_hub_id"]).partition("@")
        found = try_to_load_from_cache(repo, WEIGHTS_NAME, revision=revision or None)
        return found if isinstance(found, str) else None
    return None


def _check_weights_fit(kwargs: dict) -> None:
    """Build the spec on the meta device (nothing allocated) and compare its shapes with the weights file's header
    (no tensor read), so a config.json edited to ask for a huge conv is refused before timm allocates it. The first
    conv and the classifier are left to timm (it adapts them to in_chans / num_classes)."""
    path = _saved_weights(kwargs.get("pretrained_cfg"))
    if path is None:
        return
    import safetensors
    import torch

    with torch.device("meta"):
        net = LayerFoldedNet(**{k: v for k, v in kwargs.items()
                                if k not in ("pretrained_cfg", "pretrained_cfg_overlay")})
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # (a corrupt file: timm's own read reports it)
        return
    wrong = shape_mismatches(net, saved, skip=("features.0.", "classifier."))
    if wrong:
        raise FoldedSpecError(f"config.json model_args do not match {path} ({len(wrong)} tensor(s)): {wrong[:3]}")


@register_model
def layerfold_net(pretrained: bool = False, **kwargs: Any) -> LayerFoldedNet:
    """A ``LayerFoldedNet`` rebuilt from ``model_args`` (``features``, ``pre_logits``, ...) of a saved fold."""
    if "features" not in kwargs:
        raise ValueError(
            "layerfold_net is rebuilt from a saved folded checkpoint: create it with "
            "timm.create_model('hf-hub:<org>/<name>') or timm.create_model('local-dir:<path>') "
            "(after `import hf_layerfold`), not from the bare architecture name")
    unsupported = sorted(k for k in ("features_only", "out_indices", "feature_cfg") if kwargs.get(k))
    if unsupported:  # (timm would build the net, then fail to wrap it, and the weights would be blamed)
        raise ValueError(f"layerfold_net does not support {', '.join(unsupported)}: a folded net is a classifier "
                         "(forward_features gives the last feature map; num_classes=0 drops the classifier; for inner "
                         "maps, timm.models.create_feature_extractor(model, {'features.<i>': name}) traces it)")
    dropped = ", ".join(f"{k}={kwargs[k]}" for k in ("drop_path_rate", "drop_block_rate") if kwargs.get(k))
    if dropped:  # (timm's train.py --drop-path passes them; LayerFoldedNet's **kwargs swallowed them: nothing dropped)
        raise ValueError(f"layerfold_net has no stochastic depth or DropBlock ({dropped}): its residual branches are "
                         "merged convs, a branch absorbed into one conv cannot be dropped. Leave them unset; drop_rate "
                         "(the head's dropout) is kept")
    saved_cfg = kwargs.get("pretrained_cfg") or {}
    saved_cfg = saved_cfg if isinstance(saved_cfg, dict) else getattr(saved_cfg, "__dict__", {})
    saved_classes = saved_cfg.get("num_classes")
    if pretrained and "num_classes" not in kwargs and (isinstance(saved_classes, bool) or not isinstance(
            saved_classes, int) or saved_classes < 0):  # (timm passes no negative count on: the net took 1000
        # classes and timm then dropped the saved classifier for a random one, silently)
        raise FoldedSpecError("config.json names no valid num_classes (a whole number >= 0, at the top level or in "
                              "pretrained_cfg): the saved classifier's size is unknown")
    try:
        if pretrained:
            check_pretrained_cfg(saved_cfg, "config.json")
            _check_weights_fit(kwargs)
        return build_model_with_cfg(LayerFoldedNet, ARCHITECTURE, pretrained, **kwargs)
    except FoldedSpecError as err:  # the structure in config.json is at fault, not the weights
        cfg = kwargs.get("pretrained_cfg") or {}
        cfg = cfg if isinstance(cfg, dict) else getattr(cfg, "__dict__", {})
        where = cfg.get("hf_hub_id") if cfg.get("source") == "hf-hub" else cfg.get("file")
        if where:
            raise type(err)(f"{where}: {err}") from None
        raise
    except Exception as err:  # safetensors raises its own error type on a corrupt file
        if not pretrained:
            raise
        where = _weights_location(kwargs.get("pretrained_cfg") or {})
        raise RuntimeError(f"could not load the folded weights from {where}: {err}") from err
