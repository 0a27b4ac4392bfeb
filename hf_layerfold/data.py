"""Data loading for Layer Folding experiments: datasets in, (pixel_values, labels) batches out.

Everything here returns ordinary Hugging Face ``datasets`` objects plus a picklable collator, so the same
code path serves ``transformers.Trainer``, ``accelerate`` loops and plain ``torch.utils.data.DataLoader``.
Image decoding and augmentation happen in the collator (``collate.py``, re-exported here).
Fashion-MNIST (the IDX reader and its Hub fallback) lives in ``fashion_mnist.py`` and is re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from .collate import (
    ImageClassificationCollator,
    ImageReadError,
    build_transforms,
    float_hint,
    image_mode,
    is_number_text,
    number_text_hint,
)
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
    "ImageReadError",
    "build_transforms",
    "check_labels",
    "defer_decoding",
    "detect_columns",
    "integer_labels",
    "label_names_of",
    "load_fashion_mnist",
    "load_image_dataset",
    "num_labels_of",
    "prepare_datasets",
    "read_idx",
    "split_by_node",
]

AnyDataset: TypeAlias = (datasets.Dataset | datasets.DatasetDict | datasets.IterableDataset
                          | datasets.IterableDatasetDict)
HF_SPLITS = (datasets.Dataset, datasets.IterableDataset)
HF_DATASETS = (*HF_SPLITS, datasets.DatasetDict, datasets.IterableDatasetDict)

# Order matters: the first name present wins, so the most conventional names come first.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls", "class", "target")
_LIST_FEATURES = tuple(getattr(datasets, name) for name in ("List", "LargeList", "Sequence") if hasattr(datasets, name))


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
    directory in ``imagefolder`` layout (``class_name/xxx.png``, optionally under ``train/``, ``test/``) or a local
    copy of a Hub dataset (webdataset ``.tar`` shards, parquet files: read as ``datasets.load_dataset`` reads it), the
    literal ``"imagefolder"`` with ``data_dir``, or a Hub id such as ``timm/imagenet-1k-wds`` (use
    ``streaming=True`` for large ones). Extra ``kwargs`` go to ``datasets.load_dataset``.
    """
    if isinstance(source, datasets.DatasetDict | datasets.IterableDatasetDict):
        if split is not None and split not in source:
            raise ValueError(f"Unknown split {split!r}; the dataset has {list(source)}.")
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
        if local.is_dir() and not _holds_loose_images(local):  # a local copy of a Hub dataset (webdataset .tar
            # shards, parquet): imagefolder would find nothing, and streaming it gives an empty set, not an error
            try:
                return datasets.load_dataset(str(local), split=split, streaming=streaming, **kwargs)
            except (FileNotFoundError, ValueError) as err:
                if not isinstance(err, datasets.data_files.EmptyDatasetError) and \
                        "corresponds to no data" not in str(err):
                    raise  # e.g. an unknown split
        try:
            return datasets.load_dataset(
                "imagefolder", data_dir=str(local), split=split, streaming=streaming, **kwargs
            )
        except (FileNotFoundError, ValueError) as err:
            if not isinstance(err, datasets.data_files.EmptyDatasetError) and "corresponds to no data" not in str(err):
                raise  # e.g. an unknown split: datasets' message names the splits there are
            raise type(err)(f"{local} holds no images that imagefolder reads (layout: class_name/xxx.png, "
                            f"optionally under train/ and test/) nor data files datasets reads (webdataset .tar "
                            f"shards, parquet, ...): {err}") from err
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


def _transformed(dataset: AnyDataset) -> bool:
    """A split with a ``with_transform`` / ``set_transform`` function: its examples are what the function returns
    (often ``pixel_values`` and ``labels``), not what its features describe."""
    ds = _first_split(dataset)
    return isinstance(ds, datasets.Dataset) and ds.format.get("type") == "custom"


def _features_of(dataset: AnyDataset) -> datasets.Features | None:
    return None if _transformed(dataset) else _first_split(dataset).features


def _column_names_of(dataset: AnyDataset) -> list[str]:
    ds = _first_split(dataset)
    if _transformed(ds):
        if len(ds) == 0:
            raise ValueError("Cannot detect columns: the dataset is empty.")
        return list(ds[0])  # what the transform returns
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


def _holds_loose_images(folder: Path) -> bool:
    """Whether ``folder`` (recursively) holds an image file imagefolder reads (stops at the first)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {e.lower() for e in ImageFolder.EXTENSIONS}
    return any(p.suffix.lower() in extensions and p.is_file() for p in folder.rglob("*"))


def detect_columns(dataset: AnyDataset, *, require_label: bool = True) -> tuple[str, str | None]:
    """Return ``(image_column, label_column)`` so callers need not know each dataset's naming convention.

    Names are matched against :data:`IMAGE_COLUMN_CANDIDATES` / :data:`LABEL_COLUMN_CANDIDATES` (exact, then
    case-insensitive), a column whose declared type fits (an ``Image``; integer or ``ClassLabel`` ids) first;
    failing that, a lone ``Image`` / ``ClassLabel`` feature is used. For a dict of splits,
    the ``train`` (else first) split is inspected. With ``require_label=False`` a set without a label column (a
    test set to predict on) gives ``None`` for it.
    """
    columns = _column_names_of(dataset)
    features = _features_of(dataset) or {}
    # Among the conventional names, a column whose declared type fits comes first: an ``Image`` for the image (not
    # an ``image`` column of file names beside it), integer ids for the label (not a ``class`` column of names
    # beside a ``target`` of ids); unknown features (streaming, transforms) leave the name order alone.
    images = [c for c in columns if isinstance(features.get(c), datasets.Image)]
    ids = [c for c in columns if isinstance(features.get(c), datasets.ClassLabel) or (
        isinstance(features.get(c), datasets.Value) and pa.types.is_integer(features[c].pa_type))]
    image = _pick_column(images, IMAGE_COLUMN_CANDIDATES) or _pick_column(columns, IMAGE_COLUMN_CANDIDATES)
    label = _pick_column(ids, LABEL_COLUMN_CANDIDATES) or _pick_column(columns, LABEL_COLUMN_CANDIDATES)
    if image is None:
        typed = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        image = typed[0] if len(typed) == 1 else None
    if label is None:
        typed = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        label = typed[0] if len(typed) == 1 else None
    if image is None or (label is None and require_label):
        which = " and ".join(kind for kind, col in (("image", image), ("label", label)) if col is None)
        raise ValueError(
            f"Could not find the {which} column. Columns found: {columns}. Image column names looked for: "
            f"{list(IMAGE_COLUMN_CANDIDATES)}; label column names looked for: "
            f"{list(LABEL_COLUMN_CANDIDATES)}. "
            f"Rename the column{'s' if ' and ' in which else ''} "
            f"({', '.join(f'dataset.rename_column(old, {kind!r})' for kind in which.split(' and '))}), or build "
            "ImageClassificationCollator(transform, image_column=..., label_column=...) and pass it as the "
            "data_collator."
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


def encode_hint(label_column: str, arrow_type: Any, sample: Sequence[Any] = (), *, streaming: bool = False) -> str:
    """How to turn labels of ``arrow_type`` into class ids (numbers stored as text: see ``number_text_hint``)."""
    text = pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    if text and sample and all(is_number_text(v) for v in sample):
        return f"The labels are numbers stored as text: {number_text_hint(label_column)}."
    if pa.types.is_floating(arrow_type) and (streaming or (sample and all(float(v).is_integer() for v in sample))):
        return (f"{'If they are' if streaming else 'The labels are'} whole numbers stored as floats: "
                f"{float_hint(label_column)}.")
    if streaming:  # (an IterableDataset has no class_encode_column; its labels cannot be sampled here)
        hint = (f"Cast it with dataset.cast_column({label_column!r}, datasets.ClassLabel(names=[...])) in the "
                "order you want.")
    else:
        hint = (f"Use dataset.class_encode_column({label_column!r}) (class ids in sorted name order) or cast it to "
                "ClassLabel(names=[...]) in the order you want.")
    if streaming and text:
        hint += f" Numbers stored as text: {number_text_hint(label_column)}."
    return hint


def integer_labels(dataset: datasets.Dataset, label_column: str) -> pa.ChunkedArray:
    """The label column of a map-style split as Arrow integers; a ``ValueError`` that says what to do for lists
    (multi-label), other types (class names, floats) and missing labels."""
    labels = label_array(dataset, label_column)
    if pa.types.is_list(labels.type) or pa.types.is_large_list(labels.type) or pa.types.is_fixed_size_list(
            labels.type):
        raise ValueError(f"Label column {label_column!r} holds a list per example ({labels.type}): multi-label "
                         "data is not supported; LayerFoldingTrainer trains single-label classification (one "
                         "integer class id per image).")
    if len(labels) and labels.null_count == len(labels):
        raise ValueError(f"Label column {label_column!r} has no labels (all {len(labels)} missing): an unlabelled "
                         f"split; for predict(), drop the column first (dataset.remove_columns({label_column!r})).")
    if not pa.types.is_integer(labels.type):
        sample = pc.unique(labels.drop_null()).to_pylist()[:10_000] if labels.null_count < len(labels) else []
        raise ValueError(f"Label column {label_column!r} has type {labels.type}, expected integer class ids. "
                         f"{encode_hint(label_column, labels.type, sample)}")
    if labels.null_count:
        raise ValueError(f"Label column {label_column!r} has {labels.null_count} missing labels.")
    return labels


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
        ranges = []
        for name, ds in dataset.items():
            with naming(f"split {name!r}"):
                ranges.append(check_labels(ds, label_column, num_classes))
        found = [r for r in ranges if r is not None]
        return (min(r[0] for r in found), max(r[1] for r in found)) if found else None

    if isinstance(dataset, datasets.IterableDataset):
        declared = num_labels_of(dataset, label_column)
        if declared is not None and declared > num_classes:
            raise ValueError(
                f"Label column {label_column!r} is a ClassLabel with {declared} classes, but the model has "
                f"num_classes={num_classes}."
            )
        feature = (dataset.features or {}).get(label_column)
        if isinstance(feature, _LIST_FEATURES):
            raise ValueError(f"Label column {label_column!r} holds a list per example ({feature}): multi-label data "
                             "is not supported; LayerFoldingTrainer trains single-label classification (one integer "
                             "class id per image).")
        if isinstance(feature, datasets.Value) and not pa.types.is_integer(feature.pa_type):
            raise ValueError(f"Label column {label_column!r} has type {feature.dtype}, expected integer class ids. "
                             f"{encode_hint(label_column, feature.pa_type, streaming=True)}")
        if declared is None:
            logger.warning("The labels of streaming column %r cannot be checked before training (no ClassLabel "
                           "feature): hf_layerfold's collator checks each against the head as its batch is collated; "
                           "a data_collator of your own must check them itself.", label_column)
        return None

    if _transformed(dataset):
        return None  # a transform's labels exist only per example: the collator checks each one
    if label_column not in dataset.column_names:
        raise ValueError(f"Label column {label_column!r} not in dataset columns {dataset.column_names}.")
    if len(dataset) == 0:
        return None
    labels = integer_labels(dataset, label_column)
    stats = pc.min_max(labels)
    low, high = int(stats["min"].as_py()), int(stats["max"].as_py())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"Labels in column {label_column!r} range over [{low}, {high}], but the model has "
            f"num_classes={num_classes} (valid labels: 0..{num_classes - 1}). Use a model with a matching "
            "head (num_classes=...) or filter/remap the labels (e.g. drop -1 'unlabeled' rows)."
        )
    return low, high


@contextlib.contextmanager
def naming(what: str | None):
    """A ``ValueError`` about a set's columns or labels, raised again with which set it is about (the training set,
    the eval set, the split a ``DatasetDict`` gave): otherwise the eval set's labels read as the training set's."""
    if what is None:
        yield
        return
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from err


def check_same_classes(train: Any, evaluation: Any, what: str = "the eval set") -> None:
    """Refuse an eval set whose ``ClassLabel`` names differ from the training set's (two imagefolders read
    separately, one missing a class): class id i would be another class in each, and every metric wrong."""
    if isinstance(evaluation, Mapping):
        for name, split in evaluation.items():
            check_same_classes(train, split, f"eval set {name!r}")
        return
    reference = dataset_label_names(train)
    names = None if reference is None else dataset_label_names(evaluation)
    if names is None or names == reference:
        return
    column = detect_columns(evaluation)[1]

    def shown(v: list[str]) -> str:
        return str(v[:12])[:-1] + (", ...]" if len(v) > 12 else "]")

    if isinstance(evaluation, datasets.IterableDataset):  # (a stream has no align_labels_with_mapping)
        fix = (f"eval_set = eval_set.map(lambda e: {{{column!r}: train_names.index(eval_names[e[{column!r}]])}}, "
               f"features=datasets.Features({{**eval_set.features, {column!r}: datasets.ClassLabel(names="
               "train_names)})) with train_names and eval_names the two sets' ClassLabel names")
    else:
        fix = (f"eval_set = eval_set.align_labels_with_mapping({{name: i for i, name in enumerate(train_names)}}, "
               f"{column!r}) with train_names = the training set's ClassLabel names")
    raise ValueError(
        f"The class names of {what} {shown(names)} differ from the training set's {shown(reference)}: a class id "
        f"would name another class in each, and the metrics would be wrong. Give it the training set's ids: {fix}."
    )


def _model_num_classes(model: Any) -> int | None:
    num = getattr(model, "num_classes", None)
    if num is None:
        num = getattr(getattr(model, "config", None), "num_labels", None)
    return int(num) if isinstance(num, int) and num > 0 else None


def build_collator(model: Any, dataset: AnyDataset, *, is_training: bool,
                   input_size: int | Sequence[int] | None = None, what: str | None = None
                   ) -> ImageClassificationCollator:
    """The collator of one split: its columns detected, its labels checked against the model's head, and the
    model's timm transform (augmenting for training, deterministic otherwise)."""
    num_classes = _model_num_classes(model)
    with naming(what):
        image_column, label_column = detect_columns(dataset)
        if num_classes is not None:
            check_labels(dataset, label_column, num_classes)
    transform = build_transforms(model, is_training=is_training, input_size=input_size)
    return ImageClassificationCollator(transform, image_column, label_column, image_mode(model), num_classes)


def collator_for_split(collator: Any, dataset: Any, *, require_label: bool) -> Any:
    """The trainer's own ``collator`` fitted to a set handed to ``evaluate`` (``require_label``) or ``predict``, when
    that set lacks a column the collator reads: columns re-detected (for ``predict``, no label column means
    unlabelled batches), labels checked against the head, the transform kept. Returned as it is for a set that has
    its columns, for anything but a ``datasets`` split, and when it is not this library's collator."""
    if not isinstance(collator, ImageClassificationCollator) or not isinstance(dataset, HF_SPLITS):
        return collator
    columns = _column_names_of(dataset)
    if collator.image_column in columns and collator.label_column in columns:
        return collator
    try:
        image, label = detect_columns(dataset, require_label=require_label)
    except ValueError as err:
        raise ValueError(f"{err} (For a set handed to evaluate() or predict(), pass that collator as "
                         "LayerFoldingTrainer(eval_data_collator=...).)") from None
    if label is not None and collator.num_classes is not None:
        check_labels(dataset, label, collator.num_classes)
    return dataclasses.replace(collator, image_column=image, label_column=label)


def defer_decoding(dataset: Any) -> Any:
    """A map-style ``dataset`` with its ``Image`` columns left encoded, for the collator to decode (in DataLoader
    workers, as ``datasets`` would): a truncated or corrupt file then fails naming its path, where ``datasets``' own
    decoding names none. A dict of splits is handled split by split, a streaming split too when its features are
    known and its files are read as they come (a local folder, local shards, URLs); a split streamed from the Hub
    (``hf://``) is decoded by ``datasets`` itself, in threads inside the stream, which the cast does not undo: a
    broken image there is not named. Returned as it is: anything else, a split with a transform of its own, and an
    ``Image`` feature that converts to a mode of its own. Wrap the sets :func:`prepare_datasets` returns with it when
    a ``DataLoader`` of your own reads them, for errors that name the file."""
    if isinstance(dataset, Mapping):
        return type(dataset)({name: defer_decoding(split) for name, split in dataset.items()})
    # (streamed examples then carry their bytes, a shard's member, or their file's path / URL, which the collator
    # opens: a URL through datasets' file system, as datasets would)
    if isinstance(dataset, datasets.IterableDataset):
        if dataset.features is None:
            return dataset
    elif not isinstance(dataset, datasets.Dataset) or _transformed(dataset):
        return dataset
    for column, feature in dataset.features.items():
        if isinstance(feature, datasets.Image) and feature.decode and feature.mode is None:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


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
    eval_what = "the eval set"
    if isinstance(train, datasets.DatasetDict | datasets.IterableDatasetDict):
        splits = train
        if "train" not in splits:
            raise ValueError(f"DatasetDict passed as train has no 'train' split (splits: {list(splits)}).")
        train = splits["train"]
        if eval is None:
            picked = next((name for name in ("validation", "valid", "val", "test") if name in splits), None)
            if picked is not None:
                eval = splits[picked]
                eval_what = (f"the {picked!r} split (the eval set, picked from the DatasetDict passed as train; pass "
                             "eval_dataset=... to choose another)")
    if isinstance(eval, datasets.DatasetDict | datasets.IterableDatasetDict):
        raise ValueError(f"eval must be a single split, got a dict with splits {list(eval)}.")

    def collator_for(ds: AnyDataset, is_training: bool, what: str) -> ImageClassificationCollator:
        return build_collator(model, ds, is_training=is_training, input_size=input_size, what=what)

    if isinstance(train, datasets.Dataset) and len(train) == 0:
        raise ValueError("The training set is empty (0 rows); check the split name and any filtering.")
    train_collator = collator_for(train, True, "the training set")
    eval_collator = collator_for(eval, False, eval_what) if eval is not None else None
    if eval is not None:
        check_same_classes(train, eval, eval_what)
    return train, eval, train_collator, eval_collator


def eval_collators(model: Any, eval_dataset: Any, train_dataset: Any, *, given: Any, user_collator: Any,
                   input_size: Any) -> dict[str | None, Any]:
    """The collator of each evaluation set: key ``None`` for the single set (and for any set handed to
    ``evaluate``; without one, built from the training set), the names of a dict of sets for its entries.

    ``given`` (``eval_data_collator``) collates them all. Else, with a collator of the user's, theirs
    (``None`` here: Trainer's ``data_collator``); else a ``datasets`` split gets the deterministic timm collator
    and any other dataset ``default_data_collator`` (examples already ``{"pixel_values", "labels"}``).
    """
    if given is not None:
        return {None: given}

    def one(dataset: Any, what: str | None = None) -> Any:
        if user_collator is not None:
            return None
        if isinstance(dataset, HF_SPLITS):
            return build_collator(model, dataset, is_training=False, input_size=input_size, what=what)
        from transformers import default_data_collator  # (transformers only where a Trainer needs it)

        return default_data_collator

    if isinstance(eval_dataset, Mapping):  # a dict of sets, a DatasetDict too: Trainer evaluates each by name;
        # key None serves sets handed to evaluate / predict (deterministic: not the training collator)
        collators = {name: one(dataset, f"eval set {name!r}") for name, dataset in eval_dataset.items()}
        reference = train_dataset if train_dataset is not None else next(iter(eval_dataset.values()), None)
        return {**collators, None: None if reference is None else one(reference)}
    reference = eval_dataset if eval_dataset is not None else train_dataset
    return {None: None if reference is None else one(reference, "the eval set" if eval_dataset is not None else None)}


def check_dataset_labels(dataset: Any, num_classes: int, what: str | None = None) -> None:
    """Fail before training on labels the head cannot predict (``datasets`` objects with detectable columns and
    integer labels; other label types are the user's collator's to map)."""
    if isinstance(dataset, Mapping):
        for name, split in dataset.items():
            check_dataset_labels(split, num_classes, f"{what or 'set'} {name!r}")
        return
    if not isinstance(dataset, HF_SPLITS):
        return
    try:
        _, label_column = detect_columns(dataset)
    except ValueError:
        return  # custom columns, read by the user's collator
    feature = (dataset.features or {}).get(label_column)
    if isinstance(feature, datasets.Value) and not pa.types.is_integer(feature.pa_type):
        return  # e.g. class names as strings, mapped by the user's collator
    with naming(what):
        check_labels(dataset, label_column, num_classes)


def dataset_label_names(dataset: Any) -> list[str] | None:
    """Class names of a ``datasets`` object's label column, or ``None`` (another kind of dataset, no
    ``ClassLabel``)."""
    if not isinstance(dataset, HF_DATASETS):
        return None
    try:
        return label_names_of(dataset, detect_columns(dataset)[1])
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------------
# Distributed
# ------------------------------------------------------------------------------------------------------


def split_by_node(dataset: AnyDataset, rank: int, world_size: int) -> AnyDataset:
    """Give each process its own share of a streaming dataset, for a training loop of your own.

    Not for ``LayerFoldingTrainer``: it has accelerate split a streaming training set itself (by shard, each
    process decoding only its own; it sets ``dispatch_batches=False``), so splitting here as well would leave each
    process a 1/world_size² share. ``IterableDataset`` (and each split of an ``IterableDatasetDict``) goes through
    ``datasets.distributed.split_dataset_by_node``: whole shards per rank when ``num_shards`` is divisible by
    ``world_size``, else every ``world_size``-th example. Map-style datasets are returned unchanged (a
    ``DistributedSampler`` shards those).
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
