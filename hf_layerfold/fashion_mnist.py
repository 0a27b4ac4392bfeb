"""Fashion-MNIST from the Debian package's IDX files (offline), with the Hub dataset as a fallback.

The real data the demo, the tests and the benchmarks use: ``load_fashion_mnist`` returns a ``DatasetDict`` with
``image`` / ``label`` columns and the ten class names, optionally a stratified subset.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR_ENV = "HF_LAYERFOLD_FASHION_MNIST_DIR"
# Where the Debian package dataset-fashion-mnist installs the four IDX files.
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim


class DatasetNotAvailableError(RuntimeError):
    """Raised when a dataset is neither installed locally nor downloadable (e.g. offline)."""


class IDXFormatError(ValueError):
    """Raised when an IDX file is corrupt, truncated or not the kind of IDX file expected."""


# IDX type codes -> numpy dtypes; multi-byte types are big-endian per the format spec.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike, *, expected_magic: int | None = None) -> np.ndarray:
    """Read a (optionally gzipped) IDX file into a numpy array.

    Parsed by hand rather than via a helper package so the Debian-installed files work with no extra
    dependency; every structural check raises :class:`IDXFormatError` naming the file, because a silently
    short array would surface much later as a confusing training failure.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic; lets callers point at either .gz or decompressed files
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; truncation gives EOFError
        raise IDXFormatError(f"Cannot read IDX file {path}: {exc} (file corrupt or truncated?)") from exc
    if len(raw) < 4:
        raise IDXFormatError(f"IDX file {path} is too short ({len(raw)} bytes) to hold a header.")
    magic = int.from_bytes(raw[:4], "big")
    zero, type_code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(f"IDX file {path} has an invalid magic number 0x{magic:08x}.")
    if expected_magic is not None and magic != expected_magic:
        raise IDXFormatError(
            f"IDX file {path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            "(images and labels files swapped, or wrong file?)."
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IDXFormatError(f"IDX file {path} is truncated inside its header.")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    count = math.prod(dims)
    expected_len = header_len + count * dtype.itemsize
    if len(raw) != expected_len:
        raise IDXFormatError(
            f"IDX file {path} declares shape {tuple(dims)} ({expected_len} bytes) but holds {len(raw)} bytes "
            "(file corrupt or truncated?)."
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header_len).reshape(dims)


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _read_fashion_mnist_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, expected_magic=_IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, expected_magic=_IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise IDXFormatError(
            f"IDX file {images_path} holds images of shape {images.shape[1:]}, expected (28, 28)."
        )
    if len(images) != len(labels):
        raise IDXFormatError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels."
        )
    if len(labels) and labels.max() >= len(FASHION_MNIST_LABELS):
        raise IDXFormatError(f"IDX file {labels_path} holds label {labels.max()}, expected 0..9.")
    return images, labels.astype(np.int64)


def _encode_pgm(images: np.ndarray) -> list[bytes]:
    """Encode uint8 (N, H, W) arrays as binary PGM files.

    PGM is a raw header plus the pixels, so encoding is a single numpy copy (~100x faster than PNG for
    70k images) while PIL still decodes it losslessly to a mode "L" image through ``datasets.Image``.
    """
    n, h, w = images.shape
    header = np.frombuffer(f"P5\n{w} {h}\n255\n".encode("ascii"), dtype=np.uint8)
    buf = np.empty((n, len(header) + h * w), dtype=np.uint8)
    buf[:, : len(header)] = header
    buf[:, len(header) :] = images.reshape(n, h * w)
    return [row.tobytes() for row in buf]


def _fashion_mnist_features() -> datasets.Features:
    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_LABELS)}
    )


def _subset_indices(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray | None:
    """Pick ``size`` indices, stratified by label, so tiny demo subsets still cover every class.

    Returns None when no subsetting is needed. Per-class quotas follow the largest-remainder method so the
    total is exactly ``size``; indices are sorted to keep the original (already shuffled) order.
    """
    n = len(labels)
    if size is None or size >= n:
        return None
    if size <= 0:
        raise ValueError(f"Subset size must be positive, got {size}.")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (size / n)
    quotas = np.floor(exact).astype(np.int64)
    remainder = size - int(quotas.sum())
    if remainder:
        # Largest fractional parts get the leftover slots; random tie-break avoids always favouring class 0.
        order = np.lexsort((rng.random(len(classes)), -(exact - quotas)))
        quotas[order[:remainder]] += 1
    picked = [
        rng.choice(np.flatnonzero(labels == cls), size=int(q), replace=False)
        for cls, q in zip(classes, quotas)
        if q > 0
    ]
    return np.sort(np.concatenate(picked))


def label_array(dataset: datasets.Dataset, label_column: str) -> pa.ChunkedArray:
    # Arrow format avoids materialising Python objects; select_columns keeps any indices mapping correct.
    return dataset.select_columns([label_column]).with_format("arrow")[:][label_column]


def _subset_dataset(dataset: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    if size is None:
        return dataset
    indices = _subset_indices(label_array(dataset, "label").to_numpy(), size, seed)
    return dataset if indices is None else dataset.select(indices)


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Load Fashion-MNIST as a ``DatasetDict`` with ``train`` (60k) and ``test`` (10k) splits.

    Prefers the IDX files of the Debian package ``dataset-fashion-mnist`` (works offline, no download),
    looked up in ``data_dir``, else ``$HF_LAYERFOLD_FASHION_MNIST_DIR``, else
    /usr/share/datasets/fashion-mnist.
    Falls back to the Hub copy ``zalando-datasets/fashion_mnist``. Features: ``image`` (``datasets.Image``,
    28x28 grayscale) and ``label`` (``ClassLabel`` with the 10 class names). ``train_size`` / ``test_size``
    take a stratified random subset (for demos and tests), reproducible through ``seed``.
    """
    folder = Path(data_dir or os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DEFAULT_DIR).expanduser()
    sizes = {"train": train_size, "test": test_size}
    stems = [stem for pair in _FASHION_MNIST_FILES.values() for stem in pair]
    found = {stem: _find_idx_file(folder, stem) for stem in stems}
    missing = [stem for stem, path in found.items() if path is None]

    if not missing:
        features = _fashion_mnist_features()
        splits = {}
        for split, (images_stem, labels_stem) in _FASHION_MNIST_FILES.items():
            images, labels = _read_fashion_mnist_split(found[images_stem], found[labels_stem])
            indices = _subset_indices(labels, sizes[split], seed)
            if indices is not None:
                images, labels = images[indices], labels[indices]
            # Pre-encoded {"bytes", "path"} dicts skip datasets' per-row numpy->PNG encoding (the slow path).
            image_dicts = [{"bytes": b, "path": None} for b in _encode_pgm(images)]
            splits[split] = datasets.Dataset.from_dict(
                {"image": image_dicts, "label": labels}, features=features, split=split
            )
        return datasets.DatasetDict(splits)

    local_reason = (
        (f"{folder} is not a folder" if folder.exists() else f"folder {folder} does not exist")
        if not folder.is_dir()
        else f"folder {folder} lacks {', '.join(missing)} (.gz or uncompressed)"
    )
    chosen = data_dir is not None or os.environ.get(FASHION_MNIST_DIR_ENV)  # a folder the user named: say so loudly
    (logger.warning if chosen else logger.info)(
        "Fashion-MNIST not found locally (%s); trying the Hub dataset %s.", local_reason, FASHION_MNIST_HUB_ID
    )
    try:
        hub = datasets.load_dataset(FASHION_MNIST_HUB_ID)
    except Exception as exc:  # offline, no such repo, auth, ...: all mean "not available here"
        raise DatasetNotAvailableError(
            "Fashion-MNIST is not available. Tried:\n"
            f"  1. local IDX files: {local_reason};\n"
            f"  2. Hugging Face Hub dataset {FASHION_MNIST_HUB_ID!r}: {type(exc).__name__}: {exc}\n"
            "Fix: install the Debian package (`sudo apt-get install dataset-fashion-mnist`, which puts the "
            f"files in {FASHION_MNIST_DEFAULT_DIR}), or set {FASHION_MNIST_DIR_ENV} / pass data_dir= to a "
            "folder holding "
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
            "t10k-labels-idx1-ubyte.gz, or go online (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."
        ) from exc
    return datasets.DatasetDict({split: _local_names(_subset_dataset(hub[split], sizes[split], seed))
                                 for split in sizes})


def _local_names(split):
    """The Hub copy names class 0 "T - shirt / top": the local files' names (same ids, same order) instead, so a
    model's label names do not depend on which source was found."""
    import datasets

    label = split.features.get("label")
    if not isinstance(label, datasets.ClassLabel) or label.num_classes != len(FASHION_MNIST_LABELS) \
            or label.names == FASHION_MNIST_LABELS:
        return split
    return split.cast_column("label", datasets.ClassLabel(names=FASHION_MNIST_LABELS))
