"""Data loading for Layer Folding experiments: datasets in, (pixel_values, labels) batches out.

Everything here returns ordinary Hugging Face ``datasets`` objects plus a picklable collator, so the same
code path serves ``transformers.Trainer``, ``accelerate`` loops and plain ``torch.utils.data.DataLoader``.
Image decoding and augmentation happen in the collator (i.e. in dataloader workers) rather than in
``Dataset.map``, so nothing is re-encoded or cached on disk and streaming datasets work unchanged.
Fashion-MNIST (the IDX reader and its Hub fallback) lives in ``fashion_mnist.py`` and is re-exported here.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from .fashion_mnist import (  # re-exported: hf_layerfold.data is where users look for datasets
    FASHION_MNIST_DEFAULT_DIR,
    FASHION_MNIST_DIR_ENV,
    FASHION_MNIST_HUB_ID,
    FASHION_MNIST_LABELS,
    DatasetNotAvailableError,
    IDXFormatError,
    label_array,
    load_fashion_mnist,
    read_idx,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetNotAvailableError",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_DIR_ENV",
    "FASHION_MNIST_HUB_ID",
    "FASHION_MNIST_LABELS",
    "IDXFormatError",
    "IMAGE_COLUMN_CANDIDATES",
    "LABEL_COLUMN_CANDIDATES",
    "ImageClassificationCollator",
    "build_transforms",
    "check_labels",
    "detect_columns",
    "label_names_of",
    "load_fashion_mnist",
    "load_image_dataset",
    "num_labels_of",
    "prepare_datasets",
    "read_idx",
    "split_by_node",
]

AnyDataset = datasets.Dataset | datasets.DatasetDict | datasets.IterableDataset | datasets.IterableDatasetDict

# Order matters: the first name present wins, so the most conventional names come first.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls", "class", "target")


# ------------------------------------------------------------------------------------------------------
# Generic image datasets
# ------------------------------------------------------------------------------------------------------


def _looks_like_local_path(source: str) -> bool:
    """Tell a filesystem path from a Hub id ("owner/name") so a typo'd path is not sent to the Hub."""
    if source.startswith(("/", "./", "../", "~", ".\\", "..\\")) or source in (".", ".."):
        return True
    if "\\" in source or (len(source) > 1 and source[1] == ":"):  # Windows-style paths
        return True
    return source.count("/") > 1 or source.endswith("/")


def load_image_dataset(
    source: str | os.PathLike | AnyDataset,
    *,
    split: str | None = None,
    streaming: bool = False,
    data_dir: str | None = None,
    **kwargs: Any,
) -> AnyDataset:
    """Turn whatever the user points at into a ``datasets`` object.

    ``source`` may be an in-memory dataset (returned as is, or its ``split`` if it is a dict), a local
    directory in ``imagefolder`` layout (``class_name/xxx.png``, optionally under ``train/``, ``test/``), the
    literal ``"imagefolder"`` with ``data_dir``, or a Hub id such as ``timm/imagenet-1k-wds`` (use
    ``streaming=True`` for large ones). Extra ``kwargs`` go to ``datasets.load_dataset``.
    """
    if isinstance(source, datasets.DatasetDict | datasets.IterableDatasetDict):
        return source[split] if split is not None else source
    if isinstance(source, datasets.Dataset | datasets.IterableDataset):
        return source
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"Unsupported dataset source of type {type(source).__name__}: {source!r}")

    text = os.fspath(source)
    local = Path(text).expanduser()
    if local.is_dir():
        if data_dir is not None:
            local = local / data_dir
        return datasets.load_dataset(
            "imagefolder", data_dir=str(local), split=split, streaming=streaming, **kwargs
        )
    if local.exists():
        raise ValueError(f"{text} is a file; expected a directory in imagefolder layout or a Hub dataset id.")
    if isinstance(source, os.PathLike) or _looks_like_local_path(text):
        raise FileNotFoundError(
            f"Dataset directory {text} does not exist (resolved to {local.resolve()}). Pass an existing "
            "folder in imagefolder layout, a Hub dataset id like 'owner/name', or an in-memory "
            "datasets.Dataset."
        )
    if text == "imagefolder" and data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"imagefolder data_dir {data_dir} does not exist.")
    return datasets.load_dataset(text, split=split, streaming=streaming, data_dir=data_dir, **kwargs)


def _first_split(dataset: AnyDataset) -> datasets.Dataset | datasets.IterableDataset:
    if isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
        if not dataset:
            raise ValueError("The DatasetDict has no splits.")
        return dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    return dataset


def _features_of(dataset: AnyDataset) -> datasets.Features | None:
    return _first_split(dataset).features


def _column_names_of(dataset: AnyDataset) -> list[str]:
    ds = _first_split(dataset)
    if ds.features is not None:
        return list(ds.features)
    if ds.column_names is not None:
        return list(ds.column_names)
    # Streaming datasets often have unknown features until read; one example is the cheapest way to know.
    try:
        first = next(iter(ds))
    except StopIteration:
        raise ValueError("Cannot detect columns: the dataset is empty.") from None
    return list(first)


def _pick_column(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    for name in candidates:
        if name in columns:
            return name
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    return None


def detect_columns(dataset: AnyDataset) -> tuple[str, str]:
    """Return ``(image_column, label_column)`` so callers need not know each dataset's naming convention.

    Names are matched against :data:`IMAGE_COLUMN_CANDIDATES` / :data:`LABEL_COLUMN_CANDIDATES` (exact, then
    case-insensitive); failing that, a lone ``Image`` / ``ClassLabel`` feature is used. For a dict of splits,
    the ``train`` (else first) split is inspected.
    """
    columns = _column_names_of(dataset)
    features = _features_of(dataset) or {}
    image = _pick_column(columns, IMAGE_COLUMN_CANDIDATES)
    label = _pick_column(columns, LABEL_COLUMN_CANDIDATES)
    if image is None:
        typed = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        image = typed[0] if len(typed) == 1 else None
    if label is None:
        typed = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        label = typed[0] if len(typed) == 1 else None
    if image is None or label is None:
        which = " and ".join(kind for kind, col in (("image", image), ("label", label)) if col is None)
        raise ValueError(
            f"Could not find the {which} column. Columns found: {columns}. Image column names looked for: "
            f"{list(IMAGE_COLUMN_CANDIDATES)}; label column names looked for: "
            f"{list(LABEL_COLUMN_CANDIDATES)}. "
            "Rename the columns (dataset.rename_column) or pass image_column=/label_column= explicitly."
        )
    return image, label


def _class_label(dataset: AnyDataset, label_column: str) -> datasets.ClassLabel | None:
    feature = (_features_of(dataset) or {}).get(label_column)
    return feature if isinstance(feature, datasets.ClassLabel) else None


def num_labels_of(dataset: AnyDataset, label_column: str) -> int | None:
    """Number of classes from the ``ClassLabel`` feature, or None when the features do not say."""
    feature = _class_label(dataset, label_column)
    return feature.num_classes if feature is not None else None


def label_names_of(dataset: AnyDataset, label_column: str) -> list[str] | None:
    """Class names from the ``ClassLabel`` feature (for ``id2label``/model cards), or None if unknown."""
    feature = _class_label(dataset, label_column)
    return list(feature.names) if feature is not None else None


def check_labels(dataset: AnyDataset, label_column: str, num_classes: int) -> tuple[int, int] | None:
    """Fail before training if labels do not fit a ``num_classes``-way head.

    An out-of-range label otherwise shows up as a CUDA device-side assert (or a cryptic IndexError on CPU)
    deep inside the loss. Map-style datasets are scanned in full through Arrow (milliseconds for 1M rows);
    iterable ones cannot be scanned cheaply, so only their ``ClassLabel`` feature is checked. Returns the
    ``(min, max)`` label found for map-style datasets, else None.
    """
    if num_classes is None or int(num_classes) <= 0:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if isinstance(dataset, datasets.DatasetDict | datasets.IterableDatasetDict):
        ranges = [check_labels(ds, label_column, num_classes) for ds in dataset.values()]
        found = [r for r in ranges if r is not None]
        return (min(r[0] for r in found), max(r[1] for r in found)) if found else None

    if isinstance(dataset, datasets.IterableDataset):
        declared = num_labels_of(dataset, label_column)
        if declared is not None and declared > num_classes:
            raise ValueError(
                f"Label column {label_column!r} is a ClassLabel with {declared} classes, but the model has "
                f"num_classes={num_classes}."
            )
        if declared is None:
            logger.warning("Cannot check labels of a streaming dataset without a ClassLabel feature.")
        return None

    if label_column not in dataset.column_names:
        raise ValueError(f"Label column {label_column!r} not in dataset columns {dataset.column_names}.")
    if len(dataset) == 0:
        return None
    labels = label_array(dataset, label_column)
    if not pa.types.is_integer(labels.type):
        raise ValueError(
            f"Label column {label_column!r} has type {labels.type}, expected integer class ids. "
            "Use dataset.class_encode_column(...) or cast it to ClassLabel."
        )
    if labels.null_count:
        raise ValueError(f"Label column {label_column!r} has {labels.null_count} missing labels.")
    stats = pc.min_max(labels)
    low, high = int(stats["min"].as_py()), int(stats["max"].as_py())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"Labels in column {label_column!r} range over [{low}, {high}], but the model has "
            f"num_classes={num_classes} (valid labels: 0..{num_classes - 1}). Use a model with a matching "
            "head (num_classes=...) or filter/remap the labels (e.g. drop -1 'unlabeled' rows)."
        )
    return low, high


# ------------------------------------------------------------------------------------------------------
# Transforms and collation
# ------------------------------------------------------------------------------------------------------


def _normalize_input_size(input_size: int | Sequence[int], channels: int) -> tuple[int, int, int]:
    size = (input_size,) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
    if len(size) == 1:
        return channels, size[0], size[0]
    if len(size) == 2:
        return channels, size[0], size[1]
    if len(size) == 3:
        return size  # type: ignore[return-value]
    raise ValueError(f"input_size must be an int, (H, W) or (C, H, W); got {input_size!r}.")


def _unwrap_timm(model: Any) -> Any:
    # transformers' TimmWrapper* keep the timm model (and its pretrained_cfg) in `.timm_model`.
    if not hasattr(model, "pretrained_cfg") and hasattr(model, "timm_model"):
        return model.timm_model
    return model


def _input_channels(model: Any) -> int:
    """Input channels the model's data config asks for (3 unless a 1-channel model is configured)."""
    import timm.data

    return int(timm.data.resolve_model_data_config(_unwrap_timm(model))["input_size"][0])


def build_transforms(
    model: Any,
    *,
    is_training: bool,
    input_size: int | Sequence[int] | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """Build the timm preprocessing the model expects (mean/std, interpolation, crop), optionally resized.

    Uses the model's ``pretrained_cfg`` through ``timm.data.resolve_model_data_config``, so it works for timm
    models, any object with a ``pretrained_cfg`` dict, and transformers' ``TimmWrapper*`` (through its
    ``timm_model``).
    ``input_size`` overrides the resolution, e.g. 64 to train small models on 28x28 Fashion-MNIST quickly.
    """
    import timm.data  # local import: keeps `import hf_layerfold.data` light for dataset-only users

    cfg = dict(timm.data.resolve_model_data_config(_unwrap_timm(model)))
    if input_size is not None:
        cfg["input_size"] = _normalize_input_size(input_size, channels=int(cfg["input_size"][0]))
    return timm.data.create_transform(**cfg, is_training=is_training)


def _to_pil(value: Any) -> Image.Image:
    """Coerce what ``datasets`` may hand out (PIL, {'bytes','path'} dict, bytes, path, array) to PIL."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path") is not None:
            return Image.open(value["path"])
        raise ValueError("Image dict has neither 'bytes' nor 'path'.")
    if isinstance(value, bytes | bytearray | memoryview):
        return Image.open(io.BytesIO(bytes(value)))
    if isinstance(value, str | os.PathLike):
        return Image.open(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        array = value
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype != np.uint8:
            if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
                array = array * 255.0  # float images in [0, 1]
            array = np.clip(array, 0, 255).astype(np.uint8)
        return Image.fromarray(array)
    raise TypeError(f"Cannot convert a {type(value).__name__} to an image.")


@dataclass
class ImageClassificationCollator:
    """Turn a list of dataset examples into ``{"pixel_values", "labels"}`` tensors.

    Decoding + augmentation run here so they happen in DataLoader workers; the class holds only the
    transform and column names, hence it pickles. Use with ``Trainer(..., data_collator=collator)`` and
    ``TrainingArguments(remove_unused_columns=False)`` so the raw image column reaches it. Images are
    converted to ``image_mode`` first (grayscale datasets feed 3-channel ImageNet models).
    ``label_column=None`` collates unlabeled data (no "labels" key).
    """

    transform: Callable[[Image.Image], torch.Tensor]
    image_column: str = "image"
    label_column: str | None = "label"
    image_mode: str = "RGB"

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Cannot collate an empty batch.")
        pixels = []
        for example in examples:
            image = _to_pil(example[self.image_column])
            if image.mode != self.image_mode:
                image = image.convert(self.image_mode)
            tensor = self.transform(image)
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"The transform returned {type(tensor).__name__}; it must end with ToTensor/normalize."
                )
            pixels.append(tensor)
        batch = {"pixel_values": torch.stack(pixels).float()}
        if self.label_column is not None:
            batch["labels"] = torch.as_tensor([int(e[self.label_column]) for e in examples], dtype=torch.long)
        return batch


def _model_num_classes(model: Any) -> int | None:
    num = getattr(model, "num_classes", None)
    if num is None:
        num = getattr(getattr(model, "config", None), "num_labels", None)
    return int(num) if isinstance(num, int) and num > 0 else None


def prepare_datasets(
    model: Any,
    train: AnyDataset,
    eval: AnyDataset | None = None,
    *,
    input_size: int | Sequence[int] | None = None,
) -> tuple[
    datasets.Dataset | datasets.IterableDataset,
    datasets.Dataset | datasets.IterableDataset | None,
    ImageClassificationCollator,
    ImageClassificationCollator | None,
]:
    """One call from datasets + model to what ``Trainer`` needs: datasets and train/eval collators.

    Detects columns, validates labels against the model's head before any compute is spent, and builds
    timm transforms (augmenting for train, deterministic for eval). A ``DatasetDict`` passed as ``train``
    supplies its ``train`` split and, if ``eval`` is None, its ``validation`` or ``test`` split.
    Datasets are returned unchanged; all per-example work happens in the collators.
    """
    if isinstance(train, datasets.DatasetDict | datasets.IterableDatasetDict):
        splits = train
        if "train" not in splits:
            raise ValueError(f"DatasetDict passed as train has no 'train' split (splits: {list(splits)}).")
        train = splits["train"]
        if eval is None:
            eval = next(
                (splits[name] for name in ("validation", "valid", "val", "test") if name in splits), None
            )
    if isinstance(eval, datasets.DatasetDict | datasets.IterableDatasetDict):
        raise ValueError(f"eval must be a single split, got a dict with splits {list(eval)}.")

    num_classes = _model_num_classes(model)
    channels = _input_channels(model)
    image_mode = "L" if channels == 1 else "RGB"

    def collator_for(ds: AnyDataset, is_training: bool) -> ImageClassificationCollator:
        image_column, label_column = detect_columns(ds)
        if num_classes is not None:
            check_labels(ds, label_column, num_classes)
        transform = build_transforms(model, is_training=is_training, input_size=input_size)
        return ImageClassificationCollator(transform, image_column, label_column, image_mode)

    train_collator = collator_for(train, is_training=True)
    eval_collator = collator_for(eval, is_training=False) if eval is not None else None
    return train, eval, train_collator, eval_collator


# ------------------------------------------------------------------------------------------------------
# Distributed
# ------------------------------------------------------------------------------------------------------


def split_by_node(dataset: AnyDataset, rank: int, world_size: int) -> AnyDataset:
    """Give each process its own share of a streaming dataset.

    ``IterableDataset`` (and each split of an ``IterableDatasetDict``) goes through
    ``datasets.distributed.split_dataset_by_node``: whole shards per rank when ``num_shards`` is divisible by
    ``world_size``, else every ``world_size``-th example. Map-style datasets are returned unchanged, because
    ``Trainer``/``accelerate`` already shard them with a ``DistributedSampler``; splitting them here as well
    would make each rank see only 1/world_size² of the data.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    from datasets.distributed import split_dataset_by_node

    if isinstance(dataset, datasets.IterableDataset):
        return split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if isinstance(dataset, datasets.IterableDatasetDict):
        return datasets.IterableDatasetDict(
            {
                name: split_dataset_by_node(ds, rank=rank, world_size=world_size)
                for name, ds in dataset.items()
            }
        )
    return dataset
