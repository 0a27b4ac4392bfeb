"""From dataset examples to model inputs: timm transforms, image decoding and the collator.

Decoding and augmentation run in the collator (in DataLoader workers), not in ``Dataset.map``: nothing is re-encoded
or cached, and streaming datasets work unchanged. ``hf_layerfold.data`` re-exports what is public here.
"""

from __future__ import annotations

import io
import operator
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import ExifTags, Image, ImageOps


def input_shape(input_size: int | Sequence[int], channels: int) -> tuple[int, int, int]:
    """``(channels, height, width)`` from one side, ``(height, width)`` or ``(channels, height, width)`` (numpy
    integers too); anything else, or a size below 1, is refused."""
    try:
        size = (operator.index(input_size),) * 2
    except TypeError:
        try:
            size = () if isinstance(input_size, str) else tuple(operator.index(v) for v in input_size)
        except TypeError:
            size = ()
    if len(size) == 2:
        size = (channels, *size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError("input_size must be (channels, height, width), (height, width) or one side, in positive "
                         f"whole numbers; got {input_size!r}")
    return size  # type: ignore[return-value]


def _unwrap_timm(model: Any) -> Any:
    # transformers' TimmWrapper* keep the timm model (and its pretrained_cfg) in `.timm_model`.
    if not hasattr(model, "pretrained_cfg") and hasattr(model, "timm_model"):
        return model.timm_model
    return model


def pretrained_cfg_of(model: Any) -> dict:
    """The ``pretrained_cfg`` that describes ``model``'s preprocessing and classes. A transformers ``TimmWrapper*``
    keeps the checkpoint's in its ``config`` (its ``timm_model`` has only the architecture's defaults: for a folded
    save, 224 px and ImageNet statistics whatever was saved), and the class names in ``config.id2label``."""
    config = getattr(model, "config", None)
    if not (hasattr(model, "timm_model") and isinstance(getattr(config, "pretrained_cfg", None), Mapping)):
        return dict(getattr(_unwrap_timm(model), "pretrained_cfg", None) or {})
    cfg = dict(config.pretrained_cfg)
    names = getattr(config, "id2label", None) or {}
    listed = [str(names[i]) for i in range(len(names))] if len(names) == getattr(config, "num_labels", -1) else []
    if listed and not all(re.fullmatch(r"LABEL_\d+", n) for n in listed):  # (transformers' placeholders: none)
        cfg["label_names"] = listed
    return cfg


def data_config(model: Any) -> dict:
    """timm's data config (input size, interpolation, mean, std, crop) from :func:`pretrained_cfg_of`."""
    import timm.data

    return timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg_of(model), model=_unwrap_timm(model))


def input_channels(model: Any) -> int:
    """Input channels the model takes: its ``in_chans`` (timm records it; the data config keeps the pretrained 3
    channels for a model built with ``in_chans=1``), else what its data config says."""
    inner = _unwrap_timm(model)
    chans = getattr(inner, "in_chans", None)
    if isinstance(chans, int) and chans > 0:
        return chans
    return int(data_config(model)["input_size"][0])


def model_input_shape(model: Any, input_size: int | Sequence[int]) -> tuple[int, int, int]:
    """``(channels, height, width)`` for ``model`` from an ``input_size`` as :func:`input_shape` takes it; a channel
    count the model does not take is refused."""
    channels = input_channels(model)
    shape = input_shape(input_size, channels)
    if shape[0] != channels:
        raise ValueError(f"input_size {input_size!r} has {shape[0]} channels, but the model takes {channels}")
    return shape


CHANNEL_MODES = {1: "L", 2: "LA", 4: "RGBA"}  # (3, and any other count: RGB, whose mismatch the transform names)


def image_mode(model: Any) -> str:
    """The PIL mode images are converted to for ``model``: gray for a 1-channel model, RGB for 3 channels, gray or
    RGB with the alpha channel for 2 or 4 (an ``in_chans=4`` model reads an RGBA image's transparency)."""
    return CHANNEL_MODES.get(input_channels(model), "RGB")


def _per_channel(values: Sequence[float], channels: int, name: str) -> tuple[float, ...]:
    """A data config's mean or std for ``channels`` inputs: the pretrained RGB values averaged for a 1-channel
    model (timm's ``in_chans=1`` sums the first conv's RGB weights, so the one channel stands for all three)."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    if len(values) == 1:
        return values * channels
    raise ValueError(f"the model's data config has {len(values)} {name} values for a {channels}-channel input; give "
                     f"{channels} in its pretrained_cfg (save_folded: pretrained_cfg_overlay={{'{name}': ...}})")


def fit_channels(model: Any, cfg: Mapping[str, Any], input_size: int | Sequence[int] | None = None) -> dict:
    """A timm data config (``input_size``, ``mean``, ``std``, ...) made to fit ``model``'s input channels: timm
    keeps the pretrained ``(3, H, W)`` and RGB statistics in the config of a model built with ``in_chans=1``.
    ``input_size`` (as :func:`input_shape` takes it) replaces the config's."""
    cfg = dict(cfg)
    cfg["input_size"] = model_input_shape(model, input_size if input_size is not None else cfg["input_size"][1:])
    channels = cfg["input_size"][0]
    cfg.update(mean=_per_channel(cfg["mean"], channels, "mean"), std=_per_channel(cfg["std"], channels, "std"))
    if cfg.get("test_input_size") is not None:
        cfg["test_input_size"] = (channels, *tuple(cfg["test_input_size"])[-2:])
    return cfg


def build_transforms(
    model: Any,
    *,
    is_training: bool,
    input_size: int | Sequence[int] | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """Build the timm preprocessing the model expects (mean/std, interpolation, crop), optionally resized.

    Uses the model's ``pretrained_cfg`` through ``timm.data.resolve_data_config``, so it works for timm
    models, any object with a ``pretrained_cfg`` dict, and transformers' ``TimmWrapper*`` (the checkpoint's
    config: :func:`pretrained_cfg_of`).
    ``input_size`` overrides the resolution, e.g. 64 to train small models on 28x28 Fashion-MNIST quickly.
    """
    import timm.data  # local import: keeps `import hf_layerfold.data` light for dataset-only users

    cfg = fit_channels(model, data_config(model), input_size)
    return timm.data.create_transform(**cfg, is_training=is_training)


class ImageReadError(OSError):
    """An image of the dataset cannot be decoded (truncated, corrupt, not an image); the message names its file."""


def _open(source: Any, name: str) -> Image.Image:
    """``Image.open`` + ``load``: a broken file fails here, named, not later inside a transform. A URL (a dataset's
    remote file) is read through ``datasets``' file system, as its ``Image`` feature would."""
    try:
        if isinstance(source, str) and "://" in source:
            import datasets

            image = datasets.Image().decode_example({"path": source, "bytes": None})
        else:
            image = Image.open(source)
            image.load()
            if image.getexif().get(ExifTags.Base.Orientation) not in (None, 1):  # upright, as datasets decodes
                image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated, corrupt and unknown files
        raise ImageReadError(f"cannot read image {name}: {err}") from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"cannot read image {name}: {err} (raise PIL.Image.MAX_IMAGE_PIXELS if the image is "
                             "genuine)") from err
    return image


def _to_pil(value: Any) -> Image.Image:
    """Coerce what ``datasets`` may hand out (PIL, {'bytes','path'} dict, bytes, path, array, nested lists) to a
    PIL image of 8-bit pixels."""
    if isinstance(value, Mapping):
        name = value.get("path") or "(encoded bytes without a file name)"
        if value.get("bytes") is not None:
            return _to_pil(_open(io.BytesIO(value["bytes"]), name))
        if value.get("path") is not None:
            return _to_pil(_open(value["path"], name))
        raise ValueError("Image dict has neither 'bytes' nor 'path'.")
    if isinstance(value, bytes | bytearray | memoryview):
        return _to_pil(_open(io.BytesIO(bytes(value)), "(encoded bytes without a file name)"))
    if isinstance(value, str | os.PathLike):
        return _to_pil(_open(value, os.fspath(value)))
    if isinstance(value, Image.Image):
        if value.getexif().get(ExifTags.Base.Orientation) not in (None, 1):  # a PIL image handed in as opened: upright,
            value = ImageOps.exif_transpose(value)                            # as files, bytes and datasets' decoding
        if value.mode in _WIDE_MODES:  # 16-bit or float pixels: scaled by their range (a convert would clip)
            return _to_pil(np.asarray(value))
        return value
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, list | tuple):  # an Array3D or nested-list column comes back as Python lists
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        array = value
        if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) and array.shape[-1] not in (1, 2, 3, 4):
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3):
            raise ValueError(f"Cannot read an array of shape {value.shape} as an image (expected HW, HWC or CHW).")
        return Image.fromarray(_to_uint8(array))
    raise TypeError(f"Cannot convert a {type(value).__name__} to an image.")


def _has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` carries transparency (an alpha band, or a palette's / gray's transparent colour)."""
    return any(band in ("A", "a") for band in image.getbands()) or "transparency" in image.info


_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """8-bit pixels from any numeric array, then rounded and clipped to 0..255. Unsigned 16-bit integers (``I;16``
    images) are scaled by 255/65535 whatever their values, so every image of a 16-bit set gets the same scale.
    Where the dtype does not say the range, each array's own maximum does: floats in [0, 1] times 255, other
    integers past 255 scaled by 255/65535 (or by 255/max beyond that), other values kept."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"Cannot read an array of dtype {array.dtype} as an image.")
    high = float(array.max()) if array.size else 0.0
    if np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if high <= 1.0 else 1.0
    elif array.dtype.kind == "u" and array.dtype.itemsize == 2:  # (either byte order: I;16 and I;16B)
        scale = 255.0 / 65535.0
    else:
        scale = 1.0 if high <= 255 else 255.0 / max(high, 65535.0)
    return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)  # rounded: 0.2 * 255 is 50.999…


@dataclass
class ImageClassificationCollator:
    """Turn a list of dataset examples into ``{"pixel_values", "labels"}`` tensors.

    Decoding + augmentation run here so they happen in DataLoader workers; the class holds only the
    transform and column names, hence it pickles. Use with ``Trainer(..., data_collator=collator)`` and
    ``TrainingArguments(remove_unused_columns=False)`` so the raw image column reaches it. Images are
    converted to ``image_mode`` first (grayscale datasets feed 3-channel ImageNet models). A ``pixel_values``
    column of float arrays (an image processor's or ``with_transform``'s output) is model input already: stacked
    as it is, not transformed again. ``label_column=None``, or examples without that column (``predict`` on a
    test set), collate unlabeled data (no "labels" key). With ``num_classes`` each label is checked against the
    head as it is collated: the only check streaming data without a ``ClassLabel`` feature gets (and data from a
    ``with_transform`` function). A broken image file raises :class:`ImageReadError` naming it. Pixels wider than
    8 bits become 8-bit: 16-bit images by 255/65535, always; 32-bit integer and float images by their own range,
    guessed per image from its maximum (floats up to 1 are read as [0, 1]), so give such data 8- or 16-bit pixels,
    or a ``pixel_values`` column, when its scale matters.
    """

    transform: Callable[[Image.Image], torch.Tensor]
    image_column: str = "image"
    label_column: str | None = "label"
    image_mode: str = "RGB"
    num_classes: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Cannot collate an empty batch.")
        pixels = []
        for example in examples:
            ready = self._ready_pixels(example[self.image_column])
            if ready is not None:
                pixels.append(ready)
                continue
            if example[self.image_column] is None:
                raise ValueError(f"an example has no image (None in column {self.image_column!r}); drop such rows "
                                 f"first: dataset.filter(lambda x: x[{self.image_column!r}] is not None)")
            image = _to_pil(example[self.image_column])
            if image.mode != self.image_mode:
                if self.image_mode in ("RGBA", "LA") and not _has_alpha(image):
                    warnings.warn(f"a {image.mode} image given to a {len(self.image_mode)}-channel model has no alpha "
                                  f"channel: it is converted to {self.image_mode} with an opaque (constant) one; "
                                  "check that the dataset is the one the model's in_chans was built for",
                                  stacklevel=2)
                image = image.convert(self.image_mode)
            tensor = self.transform(image)
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"The transform returned {type(tensor).__name__}; it must end with ToTensor/normalize."
                )
            pixels.append(tensor)
        batch = {"pixel_values": torch.stack(pixels).float()}
        if self.label_column is not None and self.label_column in examples[0]:  # (an unlabelled test set: none)
            labels = [_class_id(e[self.label_column], self.label_column, self.num_classes) for e in examples]
            batch["labels"] = torch.as_tensor(labels, dtype=torch.long)
        return batch

    def _ready_pixels(self, value: Any) -> torch.Tensor | None:
        """A ``pixel_values`` float array as the tensor it is (re-reading it as 8-bit pixels would clip the
        normalized values: a dark, wrong image that still trains), its channels checked; ``None`` for an image."""
        if self.image_column != "pixel_values" or isinstance(value, Image.Image | Mapping | bytes | str):
            return None
        if isinstance(value, list | tuple):
            value = np.asarray(value)
        if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.ndim != 3:
            return None  # (a float image in HW layout is an image: transformed as the others)
        channels = Image.getmodebands(self.image_mode)
        if value.shape[0] == channels:  # channel-first, as image processors give it
            return value.float()
        if value.shape[-1] in (1, 3, 4) and value.shape[0] not in (1, 3, 4) and value.min() >= 0:
            return None  # pixels in HWC layout (floats in [0, 1] or [0, 255]): an image
        raise ValueError(f"pixel_values of shape {tuple(value.shape)}: the model takes ({channels}, H, W) inputs; "
                         "give it model-ready (normalized) arrays of that shape, or images in an 'image' column")


def is_number_text(value: Any) -> bool:
    """A label that is a class id stored as text ("7": webdataset ``cls`` files read as strings)."""
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def number_text_hint(column: str) -> str:
    """How to turn class ids stored as text into ids: a cast, not a ClassLabel of them, which would number them in
    text order ("10" before "2") and silently renumber every class past 9."""
    return (f"cast the column with dataset.cast_column({column!r}, datasets.Value('int64')) (class_encode_column "
            "would number such labels in text order: '10' before '2')")


def float_hint(column: str) -> str:
    """How to turn class ids stored as floats (a CSV or pandas column with gaps) into ids: a cast, not
    class_encode_column, which numbers them as text ("10.0" before "2.0")."""
    return (f"cast the column with dataset.cast_column({column!r}, datasets.Value('int64')) (class_encode_column "
            "would number such labels in text order: '10.0' before '2.0')")


def _class_id(value: Any, column: str, num_classes: int | None) -> int:
    """An example's label as a class id, refused with its value and column when it is not one the head has (on
    a GPU it would otherwise surface as a device-side assert inside the loss)."""
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, list | tuple | torch.Tensor | np.ndarray):
        raise ValueError(f"Label {value!r} in column {column!r} is a list: multi-label data is not supported; "
                         "LayerFoldingTrainer trains single-label classification (one integer class id per image).")
    if value is None:  # (a webdataset sample without its cls file, a row with a missing label)
        raise ValueError(f"an example has no label (None in column {column!r}): drop such examples first, e.g. "
                         f"dataset.filter(lambda e: e[{column!r}] is not None)")
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        if is_number_text(value):
            raise ValueError(f"Label {value!r} in column {column!r} is not an integer class id but a number stored as "
                             f"text: {number_text_hint(column)}.")
        if isinstance(value, float | np.floating) and float(value).is_integer():
            raise ValueError(f"Label {value!r} in column {column!r} is not an integer class id but a whole number "
                             f"stored as a float: {float_hint(column)}.")
        raise ValueError(f"Label {value!r} in column {column!r} is not an integer class id; map class names to ids "
                         "first (dataset.class_encode_column or cast_column to ClassLabel).")
    if num_classes is not None and not 0 <= value < num_classes:
        unlabelled = (" A negative label usually marks an unlabelled example (a Hub test split without labels): for "
                      f"predict(), drop the column first (dataset.remove_columns({column!r}))." if value < 0 else "")
        raise ValueError(f"Label {value} in column {column!r} is outside the model's classes 0..{num_classes - 1}; "
                         f"use a model with a matching head (num_classes=...) or filter/remap the labels.{unlabelled}")
    return int(value)


def as_input_of(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Images in the dtype of the model's weights (a ``.bfloat16()`` or float64 model, a folded save reloaded in
    its saved dtype): the collators make float32. Under autocast the weights stay float32 and nothing changes."""
    weight = next(model.parameters(), None)
    if weight is None or not weight.is_floating_point() or not pixel_values.is_floating_point():
        return pixel_values
    return pixel_values.to(weight.dtype)


def drop_test_size(cfg: dict, keep: Mapping = ()) -> None:
    """Remove the base model's test-time size and crop from a pretrained_cfg given a new input size (they belong to
    its own training size: timm's validate.py would evaluate at them), except those ``keep`` sets."""
    for key in ("test_input_size", "test_crop_pct"):
        if key not in keep:
            cfg.pop(key, None)
