"""Tests for hf_layerfold.data: offline, CPU-only, a few seconds in total."""

from __future__ import annotations

import copy
import gzip
import io
import pickle
import struct
import types
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from hf_layerfold import data as hd

FASHION_DIR = Path(hd.FASHION_MNIST_DEFAULT_DIR)
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network; env vars alone are read at import, so config is patched too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.delenv(hd.FASHION_MNIST_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def fashion_small() -> datasets.DatasetDict:
    return hd.load_fashion_mnist(train_size=100, test_size=50, seed=0)


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    import timm

    return timm.create_model("mobilenetv2_050", pretrained=False, num_classes=10).eval()


def _write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def _write_fake_fashion(folder: Path, n_train: int = 20, n_test: int = 10) -> Path:
    """Tiny but valid Fashion-MNIST folder: image i is filled with value i, label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


# ----------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------------


@needs_fashion
def test_fashion_mnist_full_dataset() -> None:
    ds = hd.load_fashion_mnist()
    assert set(ds) == {"train", "test"}
    assert (ds["train"].num_rows, ds["test"].num_rows) == (60000, 10000)
    assert isinstance(ds["train"].features["image"], datasets.Image)
    assert ds["train"].features["label"].names == [
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
    # Fashion-MNIST is exactly balanced: 6000 / 1000 examples per class.
    assert np.bincount(np.asarray(ds["train"]["label"][:])).tolist() == [6000] * 10
    assert np.bincount(np.asarray(ds["test"]["label"][:])).tolist() == [1000] * 10
    first = ds["train"][0]
    assert first["label"] == 9  # the well-known first training example is an ankle boot
    assert (first["image"].size, first["image"].mode) == ((28, 28), "L")
    assert np.asarray(first["image"]).max() > 0


@needs_fashion
def test_fashion_mnist_stratified_subset(fashion_small: datasets.DatasetDict) -> None:
    assert (fashion_small["train"].num_rows, fashion_small["test"].num_rows) == (100, 50)
    assert np.bincount(np.asarray(fashion_small["train"]["label"][:]), minlength=10).tolist() == [10] * 10
    assert np.bincount(np.asarray(fashion_small["test"]["label"][:]), minlength=10).tolist() == [5] * 10
    again = hd.load_fashion_mnist(train_size=100, test_size=50, seed=0)
    other = hd.load_fashion_mnist(train_size=100, test_size=50, seed=1)
    same = [np.asarray(again["train"][i]["image"]) for i in range(5)]
    assert all(np.array_equal(a, np.asarray(fashion_small["train"][i]["image"])) for i, a in enumerate(same))
    assert not all(np.array_equal(np.asarray(other["train"][i]["image"]), a) for i, a in enumerate(same)), (
        "a different seed should pick different images"
    )


def test_fashion_mnist_env_override_and_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _write_fake_fashion(tmp_path / "fm")
    monkeypatch.setenv(hd.FASHION_MNIST_DIR_ENV, str(folder))
    ds = hd.load_fashion_mnist()
    assert (ds["train"].num_rows, ds["test"].num_rows) == (20, 10)
    assert ds["train"]["label"][:] == [i % 10 for i in range(20)]
    # Pixels survive the encode/decode round trip exactly.
    assert all(np.all(np.asarray(ds["train"][i]["image"]) == i) for i in (0, 7, 19))
    # train_size larger than the split is bounded, not an error.
    assert hd.load_fashion_mnist(train_size=10_000)["train"].num_rows == 20


def test_read_idx_uncompressed_roundtrip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = hd.read_idx(_write_idx(tmp_path / "x-idx3-ubyte", array, compress=False), expected_magic=0x803)
    assert out.shape == (2, 3, 4) and np.array_equal(out, array)


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        ("truncated_gzip", "corrupt or truncated"),
        ("garbled_gzip", "corrupt or truncated"),
        ("not_gzip_bad_magic", "invalid magic number"),
        ("short_payload", "declares shape"),
        ("labels_magic_for_images", "expected 0x00000803"),
    ],
)
def test_corrupt_idx_file_gives_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corruption: str, message: str
) -> None:
    folder = _write_fake_fashion(tmp_path / "fm")
    target = folder / "train-images-idx3-ubyte.gz"
    if corruption == "truncated_gzip":
        target.write_bytes(target.read_bytes()[:-20])
    elif corruption == "garbled_gzip":
        garbled = bytearray(target.read_bytes())
        garbled[20:60] = b"\xff" * 40
        target.write_bytes(bytes(garbled))
    elif corruption == "not_gzip_bad_magic":
        target.write_bytes(b"this is not an IDX file at all")
    elif corruption == "short_payload":
        payload = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(payload[:-100]))
    else:
        _write_idx(target, np.zeros(20, dtype=np.uint8))
    monkeypatch.setattr(datasets, "load_dataset", _must_not_be_called)
    with pytest.raises(hd.IDXFormatError, match=message) as info:
        hd.load_fashion_mnist(data_dir=str(folder))
    assert str(target) in str(info.value)


def _must_not_be_called(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"load_dataset must not be called here: {args} {kwargs}")


def test_missing_folder_offline_raises_dataset_not_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple] = []

    def offline_load_dataset(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise ConnectionError("Couldn't reach the Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline_load_dataset)
    missing = tmp_path / "does-not-exist"
    with pytest.raises(hd.DatasetNotAvailableError) as info:
        hd.load_fashion_mnist(data_dir=str(missing))
    text = str(info.value)
    assert calls == [(hd.FASHION_MNIST_HUB_ID,)], "the Hub fallback must be tried exactly once"
    assert str(missing) in text and hd.FASHION_MNIST_HUB_ID in text and "offline mode" in text
    assert "apt-get install dataset-fashion-mnist" in text
    assert isinstance(info.value, RuntimeError) and isinstance(info.value.__cause__, ConnectionError)


def test_cli_error_for_missing_fashion_mnist_names_the_file_and_the_hub_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hf_layerfold.workflow import FASHION_MNIST, CLIError, load_data

    def offline_load_dataset(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach the Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline_load_dataset)
    folder = _write_fake_fashion(tmp_path / "fm")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv(hd.FASHION_MNIST_DIR_ENV, str(folder))
    with pytest.raises(CLIError) as info:
        load_data(FASHION_MNIST)
    text = str(info.value)
    assert "\n" not in text and info.value.code == 1
    assert f"{folder} lacks t10k-labels-idx1-ubyte" in text and "offline mode is enabled" in text
    assert "apt-get install dataset-fashion-mnist" in text
    # a path that is a file, not a folder, is not reported as missing
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(hd.DatasetNotAvailableError, match=f"{not_a_folder} is not a folder"):
        hd.load_fashion_mnist(data_dir=not_a_folder)


def test_missing_folder_falls_back_to_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_names = ["T - shirt / top", *hd.FASHION_MNIST_LABELS[1:]]  # as the Hub dataset's card names class 0
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=hub_names)})
    image = Image.new("L", (28, 28))

    def fake_hub(name: str) -> datasets.DatasetDict:
        assert name == hd.FASHION_MNIST_HUB_ID
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_dict(
                    {"image": [image] * n, "label": [i % 10 for i in range(n)]}, features=features
                )
                for split, n in (("train", 40), ("test", 20))
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    # An incomplete folder (one file missing) also falls back rather than half-loading.
    folder = _write_fake_fashion(tmp_path / "fm")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    ds = hd.load_fashion_mnist(data_dir=str(folder), train_size=20, seed=3)
    assert (ds["train"].num_rows, ds["test"].num_rows) == (20, 20)
    assert sorted(ds["train"]["label"][:]) == sorted(list(range(10)) * 2)
    assert ds["test"].features["label"].names == hd.FASHION_MNIST_LABELS  # whichever source was found


# ----------------------------------------------------------------------------------------------------
# Generic loading, columns and labels
# ----------------------------------------------------------------------------------------------------


def test_load_imagefolder(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 12), color).save(root / cls / f"{i}.png")
    Image.new("L", (16, 12), 128).save(root / "dog" / "gray.png")
    ds = hd.load_image_dataset(str(root), split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds, datasets.Dataset) and ds.num_rows == 7
    assert hd.detect_columns(ds) == ("image", "label")
    assert hd.label_names_of(ds, "label") == ["cat", "dog"]
    assert hd.num_labels_of(ds, "label") == 2
    assert hd.check_labels(ds, "label", 2) == (0, 1)


def test_load_missing_local_path_is_clear(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "train"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hd.load_image_dataset(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hd.load_image_dataset(missing)  # a Path object is always local, never a Hub id
    with pytest.raises(FileNotFoundError):
        hd.load_image_dataset("./relative/missing/dir")


def test_hub_id_is_forwarded_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}

    def fake_load_dataset(path: str, **kwargs: object) -> str:
        seen.update(kwargs, path=path)
        return "sentinel"

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = hd.load_image_dataset("timm/imagenet-1k-wds", split="validation", streaming=True)
    assert out == "sentinel"
    assert seen == {
        "path": "timm/imagenet-1k-wds",
        "split": "validation",
        "streaming": True,
        "data_dir": None,
    }


def _jpg_cls_dataset(n: int = 6, gray: bool = False) -> datasets.Dataset:
    mode = "L" if gray else "RGB"
    images = [Image.new(mode, (20, 20), 30 * i) for i in range(n)]
    return datasets.Dataset.from_dict(
        {"jpg": images, "cls": [i % 3 for i in range(n)], "__key__": list("abcdef")[:n]}
    )


def test_in_memory_dataset_jpg_cls() -> None:
    ds = _jpg_cls_dataset()
    assert hd.load_image_dataset(ds) is ds
    dd = datasets.DatasetDict({"train": ds})
    assert hd.load_image_dataset(dd) is dd and hd.load_image_dataset(dd, split="train") is ds
    assert hd.detect_columns(ds) == ("jpg", "cls")
    assert hd.num_labels_of(ds, "cls") is None and hd.label_names_of(ds, "cls") is None  # plain ints
    iterable = ds.to_iterable_dataset()
    assert hd.load_image_dataset(iterable) is iterable
    assert hd.detect_columns(iterable) == ("jpg", "cls")


def test_detect_columns_on_iterable_without_features() -> None:
    def gen():
        for i in range(3):
            yield {"Image": np.zeros((4, 4), np.uint8), "target": i}

    iterable = datasets.IterableDataset.from_generator(gen)
    assert iterable.features is None
    assert hd.detect_columns(iterable) == ("Image", "target")  # found by peeking + case-insensitive match


def test_detect_columns_error_lists_columns() -> None:
    ds = datasets.Dataset.from_dict({"foo": [1], "bar": [2]})
    with pytest.raises(ValueError) as info:
        hd.detect_columns(ds)
    text = str(info.value)
    assert "image and label" in text
    assert "'foo'" in text and "'bar'" in text
    assert all(name in text for name in hd.IMAGE_COLUMN_CANDIDATES + hd.LABEL_COLUMN_CANDIDATES)


def test_check_labels() -> None:
    ds = datasets.Dataset.from_dict({"label": [0, 3, 12, 5]})
    with pytest.raises(ValueError, match=r"range over \[0, 12\].*num_classes=10"):
        hd.check_labels(ds, "label", 10)
    assert hd.check_labels(ds, "label", 13) == (0, 12)
    # The scan must honour an indices mapping (select), not the underlying table.
    assert hd.check_labels(ds.select([3, 1]), "label", 10) == (3, 5)  # non-contiguous -> indices mapping
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        hd.check_labels(datasets.Dataset.from_dict({"label": [2, -1]}), "label", 10)
    with pytest.raises(ValueError, match="expected integer class ids"):
        hd.check_labels(datasets.Dataset.from_dict({"label": ["cat", "dog"]}), "label", 10)


def test_check_labels_iterable_uses_classlabel() -> None:
    features = datasets.Features({"label": datasets.ClassLabel(num_classes=20)})
    iterable = datasets.Dataset.from_dict({"label": [0, 1]}, features=features).to_iterable_dataset()
    with pytest.raises(ValueError, match="20 classes.*num_classes=10"):
        hd.check_labels(iterable, "label", 10)
    assert hd.check_labels(iterable, "label", 20) is None


def test_split_by_node() -> None:
    ds = datasets.Dataset.from_dict({"x": list(range(10))})
    assert hd.split_by_node(ds, rank=1, world_size=2) is ds
    iterable = ds.to_iterable_dataset(num_shards=2)
    parts = [[e["x"] for e in hd.split_by_node(iterable, rank=r, world_size=2)] for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == list(range(10)) and not set(parts[0]) & set(parts[1])
    with pytest.raises(ValueError):
        hd.split_by_node(iterable, rank=2, world_size=2)


# ----------------------------------------------------------------------------------------------------
# Transforms and collation
# ----------------------------------------------------------------------------------------------------


@needs_fashion
def test_collator_with_timm_model(fashion_small: datasets.DatasetDict, small_model: torch.nn.Module) -> None:
    train_tf = hd.build_transforms(small_model, is_training=True, input_size=64)
    eval_tf = hd.build_transforms(small_model, is_training=False, input_size=(64, 64))
    examples = [fashion_small["train"][i] for i in range(4)]
    assert examples[0]["image"].mode == "L"
    for tf in (train_tf, eval_tf):
        batch = hd.ImageClassificationCollator(tf, "image", "label")(examples)
        assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
        assert batch["labels"].dtype == torch.long
        assert batch["labels"].tolist() == [e["label"] for e in examples]
    # Grayscale becomes 3 identical channels under the deterministic eval transform (up to normalisation).
    pixels = batch["pixel_values"][0]
    mean = torch.tensor(small_model.pretrained_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(small_model.pretrained_cfg["std"]).view(3, 1, 1)
    raw = pixels * std + mean
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)
    with torch.no_grad():
        assert small_model(batch["pixel_values"]).shape == (4, 10)


def test_collator_is_picklable_and_handles_raw_formats(small_model: torch.nn.Module) -> None:
    collator = hd.ImageClassificationCollator(
        hd.build_transforms(small_model, is_training=False, input_size=32),
        image_column="jpg",
        label_column="cls",
    )
    clone = pickle.loads(pickle.dumps(collator))
    png = io.BytesIO()
    Image.new("L", (10, 10), 200).save(png, format="PNG")
    examples = [
        {"jpg": Image.new("RGB", (10, 10), (200, 200, 200)), "cls": 0},
        {"jpg": np.full((10, 10), 200, np.uint8), "cls": np.int64(1)},  # HxW grayscale array
        {"jpg": np.full((3, 10, 10), 200, np.uint8), "cls": 2},  # CHW array
        {"jpg": {"bytes": png.getvalue(), "path": None}, "cls": torch.tensor(1)},  # undecoded datasets value
        {"jpg": png.getvalue(), "cls": 0},
    ]
    a, b = collator(examples), clone(examples)
    assert a["pixel_values"].shape == (5, 3, 32, 32) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert a["labels"].tolist() == [0, 1, 2, 1, 0]
    # Every representation of the same grey image gives the same tensor.
    assert all(torch.allclose(a["pixel_values"][0], a["pixel_values"][i], atol=1e-5) for i in range(1, 5))


def test_collator_reads_wide_and_list_images_and_checks_labels(small_model: torch.nn.Module) -> None:
    """16-bit pixels are scaled by their range (not clipped to two values), array columns that come back as
    Python lists are read, and each label is checked against the head as it is collated."""
    collator = hd.ImageClassificationCollator(hd.build_transforms(small_model, is_training=False, input_size=16),
                                              num_classes=10)
    ramp8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ramp16 = ramp8.astype(np.uint16) * 257  # the same ramp over the 16-bit range
    assert Image.fromarray(ramp16).mode == "I;16"
    listed = datasets.Dataset.from_dict({"image": [ramp8], "label": [3]})[0]  # a List(List(uint8)) column
    assert isinstance(listed["image"], list)
    examples = [{"image": ramp8, "label": 0}, {"image": ramp16, "label": 1},
                {"image": Image.fromarray(ramp16), "label": 2}, listed,
                {"image": ramp8.astype(np.float32) / 255, "label": np.int64(4)}]
    batch = collator(examples)
    assert batch["labels"].tolist() == [0, 1, 2, 3, 4]
    assert len(torch.unique(batch["pixel_values"][0])) > 100
    for i in range(1, len(examples)):
        torch.testing.assert_close(batch["pixel_values"][i], batch["pixel_values"][0])
    with pytest.raises(ValueError, match=r"Label '7' in column 'label' is not an integer class id"):
        collator([{"image": ramp8, "label": "7"}])
    with pytest.raises(ValueError, match=r"Label 10 in column 'label' is outside the model's classes 0\.\.9"):
        collator([{"image": ramp8, "label": 10}])
    with pytest.raises(ValueError, match=r"an example has no label \(None in column 'label'\): drop such examples "
                                         r"first, e.g. dataset.filter"):  # (a webdataset sample without its cls)
        collator([{"image": ramp8, "label": None}])
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2, 2\)"):
        collator([{"image": np.zeros((2, 2, 2, 2), np.uint8), "label": 0}])


def test_prepare_datasets_refuses_an_empty_training_set(fashion_small: datasets.DatasetDict,
                                                        small_model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="training set is empty"):
        hd.prepare_datasets(small_model, fashion_small["train"].select([]))
    assert hd.prepare_datasets(small_model, fashion_small["train"])[2].num_classes == 10


def test_build_transforms_from_plain_pretrained_cfg() -> None:
    class Bare(torch.nn.Module):
        pretrained_cfg = {
            "input_size": (3, 24, 24),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        }

    tf = hd.build_transforms(Bare(), is_training=False)
    out = tf(Image.new("RGB", (50, 40), (255, 255, 255)))
    assert out.shape == (3, 24, 24)
    assert torch.allclose(out, torch.full_like(out, (1.0 - 0.5) / 0.25))  # the dict's mean/std were used
    # Not even an nn.Module: anything exposing pretrained_cfg works, as does a TimmWrapper-style .timm_model.
    plain = hd.build_transforms(types.SimpleNamespace(pretrained_cfg=Bare.pretrained_cfg), is_training=False)
    assert torch.equal(plain(Image.new("RGB", (50, 40), (255, 255, 255))), out)
    wrapped = hd.build_transforms(types.SimpleNamespace(timm_model=Bare()), is_training=False)
    assert wrapped(Image.new("RGB", (50, 40))).shape == (3, 24, 24)
    train_tf = hd.build_transforms(Bare(), is_training=True, input_size=(3, 16, 20))
    assert train_tf(Image.new("RGB", (50, 40))).shape == (3, 16, 20)  # (C, H, W) override of the cfg size


@needs_fashion
def test_prepare_datasets(fashion_small: datasets.DatasetDict, small_model: torch.nn.Module) -> None:
    train, evalset, train_collator, eval_collator = hd.prepare_datasets(
        small_model, fashion_small, input_size=48
    )
    assert train is fashion_small["train"] and evalset is fashion_small["test"]
    assert (train_collator.image_column, train_collator.label_column) == ("image", "label")
    assert eval_collator is not None
    batch = eval_collator([evalset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 48, 48)

    import timm

    too_small = timm.create_model("mobilenetv2_050", pretrained=False, num_classes=5)
    with pytest.raises(ValueError, match="num_classes=5"):
        hd.prepare_datasets(too_small, fashion_small["train"], fashion_small["test"])


@needs_fashion
def test_collator_with_trainer(
    fashion_small: datasets.DatasetDict, small_model: torch.nn.Module, tmp_path: Path
) -> None:
    from transformers import Trainer, TrainingArguments

    class Classifier(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
            logits = self.net(pixel_values)
            loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return {"loss": loss, "logits": logits}

    train, evalset, train_collator, _ = hd.prepare_datasets(small_model, fashion_small, input_size=32)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=Classifier(copy.deepcopy(small_model)),
        args=args,
        train_dataset=train,
        data_collator=train_collator,
    )
    result = trainer.train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)


def test_local_imagefolder_errors_say_what_is_missing(tmp_path):
    """An empty folder: no images (the same FileNotFoundError type); an unknown split: datasets' own message, which
    names the splits the folder has."""
    from hf_layerfold.data import load_image_dataset

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images that imagefolder reads"):
        load_image_dataset(tmp_path / "empty")
    for i in range(2):
        (tmp_path / "ds" / "cat").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "ds" / "cat" / f"{i}.png")
    with pytest.raises(ValueError, match="Unknown split") as info:
        load_image_dataset(tmp_path / "ds", split="validation")
    assert "holds no images" not in str(info.value)


def test_16_bit_images_share_one_scale() -> None:
    """The scale used to come from each image's own maximum: a dark 16-bit image (brightest pixel 255) came out
    white, one a step brighter black."""
    from hf_layerfold.collate import _to_pil

    for make in (lambda v: Image.fromarray(np.full((4, 4), v, np.uint16)), lambda v: np.full((4, 4), v, np.uint16)):
        assert [int(np.asarray(_to_pil(make(v))).max()) for v in (255, 256, 65535)] == [1, 1, 255]


def test_model_ready_pixel_values_pass_through(small_model: torch.nn.Module) -> None:
    """A pixel_values column (an image processor's output) used to be re-read as 8-bit pixels and transformed
    again: negative values clipped, a dark image that still trained."""
    pixels = torch.randn(4, 3, 16, 16)
    ds = datasets.Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": [0, 1, 2, 3]})
    collator = hd.prepare_datasets(small_model, ds)[2]
    assert (collator.image_column, collator.label_column) == ("pixel_values", "labels")
    torch.testing.assert_close(collator([ds[i] for i in range(4)])["pixel_values"], pixels)  # Python lists
    torch.testing.assert_close(collator(list(ds.with_format("torch")))["pixel_values"], pixels)
    with pytest.raises(ValueError, match=r"pixel_values of shape \(1, 16, 16\): the model takes \(3, H, W\)"):
        collator([{"pixel_values": np.zeros((1, 16, 16), np.float32), "labels": 0}])


@needs_fashion
def test_a_with_transform_dataset_is_read_by_what_its_transform_returns(
    fashion_small: datasets.DatasetDict, small_model: torch.nn.Module
) -> None:
    """The transformers tutorials' pattern: columns were detected from the features (image, label), and training
    failed at its first batch with KeyError: 'image'."""
    tf = hd.build_transforms(small_model, is_training=False, input_size=16)

    def to_inputs(batch: dict, shift: int = 0) -> dict:
        return {"pixel_values": [tf(im.convert("RGB")) for im in batch["image"]],
                "labels": [label + shift for label in batch["label"]]}

    source = fashion_small["test"].select(range(4))
    ds = source.with_transform(to_inputs)
    train, _, collator, _ = hd.prepare_datasets(small_model, ds)
    assert train is ds and (collator.image_column, collator.label_column) == ("pixel_values", "labels")
    batch = collator([ds[i] for i in range(4)])
    torch.testing.assert_close(batch["pixel_values"], torch.stack([ds[i]["pixel_values"] for i in range(4)]))
    assert batch["labels"].tolist() == [source[i]["label"] for i in range(4)]
    shifted = source.with_transform(lambda b: to_inputs(b, shift=10))
    collator = hd.prepare_datasets(small_model, shifted)[2]  # labels exist only per example: checked as collated
    with pytest.raises(ValueError, match="outside the model's classes 0..9"):
        collator([shifted[0]])


def test_a_truncated_image_is_named(tmp_path: Path, small_model: torch.nn.Module) -> None:
    """datasets decodes an Image column itself and named no file; the collator decodes it instead."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "JPEG")
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "0.jpg").write_bytes(buffer.getvalue())
    broken = tmp_path / "b" / "1.jpg"
    broken.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    folder = hd.load_image_dataset(tmp_path, split="train")
    _, _, collator, _ = hd.prepare_datasets(small_model, folder)
    train = hd.defer_decoding(folder)  # what LayerFoldingTrainer hands its own collators
    assert train.features["image"] == datasets.Image(decode=False) and folder.features["image"].decode
    paths = [train[i]["image"]["path"] for i in range(len(train))]
    assert collator([train[paths.index(str(tmp_path / "a" / "0.jpg"))]])["pixel_values"].shape == (1, 3, 224, 224)
    truncated = f"cannot read image {broken}: (image file is truncated|Truncated File Read)"
    with pytest.raises(hd.ImageReadError, match=truncated):
        collator([train[paths.index(str(broken))]])
    # streamed: the examples carry their paths too (datasets' own decoding raised an OSError naming no file)
    stream = hd.defer_decoding(hd.load_image_dataset(tmp_path, split="train", streaming=True))
    examples = {example["image"]["path"]: example for example in stream}
    assert set(examples) == set(paths)
    with pytest.raises(hd.ImageReadError, match=truncated):
        collator([examples[str(broken)]])


def test_the_collator_decodes_as_datasets_does(small_model: torch.nn.Module) -> None:
    """An EXIF-rotated JPEG (a phone's photo) comes out upright, as datasets' Image feature gives it; 16-bit signed
    arrays and float images in HWC layout under a pixel_values name are images, not model input."""
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # rotated 90°
    Image.new("RGB", (40, 20), (10, 200, 30)).save(buffer, "JPEG", exif=exif)
    ds = datasets.Dataset.from_dict({"image": [{"bytes": buffer.getvalue(), "path": None}]},
                                    features=datasets.Features({"image": datasets.Image()}))
    from hf_layerfold.collate import _to_pil, _to_uint8

    assert ds[0]["image"].size == _to_pil(hd.defer_decoding(ds)[0]["image"]).size == (20, 40)
    assert _to_pil(Image.open(io.BytesIO(buffer.getvalue()))).size == (20, 40)  # a PIL image handed in as opened
    assert _to_uint8(np.full((2, 2), 200, np.int16)).max() == 200  # only unsigned 16-bit is scaled by 65535
    assert _to_uint8(np.full((2, 2), 257 * 100, ">u2")).max() == 100  # in either byte order (I;16B)
    assert _to_uint8(np.full((2, 2), 100, ">u2")).max() == 0
    collator = hd.ImageClassificationCollator(hd.build_transforms(small_model, is_training=False, input_size=16),
                                              image_column="pixel_values", label_column=None)
    hwc = np.random.default_rng(0).random((20, 24, 3), dtype=np.float32)
    assert collator([{"pixel_values": hwc}])["pixel_values"].shape == (1, 3, 16, 16)  # transformed as an image
    with pytest.raises(ValueError, match=r"pixel_values of shape \(20, 24, 3\): the model takes \(3, H, W\)"):
        collator([{"pixel_values": (hwc - 0.5) / 0.25}])  # normalized channels-last: not pixels, not model input


def test_an_rgba_model_reads_transparency_and_a_missing_image_is_named() -> None:
    """An in_chans=4 model had its RGBA images converted to RGB (then a shape error in the transform); a row whose
    image is None failed with PIL's 'Cannot convert a NoneType to an image'."""
    import timm

    model = timm.create_model("mobilenetv2_050", in_chans=4, num_classes=3)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5,) * 4, "std": (0.5,) * 4}
    assert hd.image_mode(model) == "RGBA"
    collator = hd.ImageClassificationCollator(hd.build_transforms(model, is_training=False, input_size=16),
                                              image_mode=hd.image_mode(model))
    rgba = Image.new("RGBA", (20, 20), (10, 20, 30, 0))
    batch = collator([{"image": rgba, "label": 1}])["pixel_values"]
    assert batch.shape == (1, 4, 16, 16) and float(batch[0, 3].max()) == -1.0  # alpha 0, normalized
    with pytest.raises(ValueError, match=r"an example has no image \(None in column 'image'\); drop such rows"):
        collator([{"image": None, "label": 1}])
    with pytest.warns(UserWarning, match="has no alpha channel"):  # an RGB image: an opaque alpha, said
        batch = collator([{"image": Image.new("RGB", (20, 20), (10, 20, 30)), "label": 1}])["pixel_values"]
    assert float(batch[0, 3].min()) == 1.0
    two = timm.create_model("resnet10t", in_chans=2, num_classes=3)
    two.pretrained_cfg = {**two.pretrained_cfg, "mean": (0.5,) * 2, "std": (0.5,) * 2}
    la = hd.ImageClassificationCollator(hd.build_transforms(two, is_training=False, input_size=16),
                                        image_mode=hd.image_mode(two))
    chw = np.random.default_rng(0).integers(0, 256, (2, 20, 20), dtype=np.uint8)  # 2-channel CHW, as torch formats
    assert la([{"image": chw, "label": 0}])["pixel_values"].shape == (1, 2, 16, 16)


def test_refusals_of_unknown_splits_and_multi_label_data() -> None:
    image = np.zeros((4, 4), np.uint8)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [image], "label": [0]})})
    for source in (splits, datasets.IterableDatasetDict({"train": splits["train"].to_iterable_dataset()})):
        with pytest.raises(ValueError, match=r"Unknown split 'validation'; the dataset has \['train'\]"):
            hd.load_image_dataset(source, split="validation")
    multi = datasets.Dataset.from_dict({"image": [image], "labels": [[0, 3]]})
    with pytest.raises(ValueError, match="holds a list per example .*multi-label data is not supported"):
        hd.check_labels(multi, "labels", 10)
    collator = hd.ImageClassificationCollator(lambda im: torch.zeros(3, 2, 2), num_classes=10)
    with pytest.raises(ValueError, match="multi-label data is not supported"):
        collator([{"image": image, "label": [0, 3]}])  # a stream's labels, met as they are collated


def test_labels_stored_as_numbers_in_text_are_told_to_be_cast_not_class_encoded() -> None:
    """class_encode_column numbers '0'..'11' in text order ('10' before '2'): every class past 9 would move."""
    ds = datasets.Dataset.from_dict({"cls": [str(i) for i in range(12)]})
    with pytest.raises(ValueError, match=r"numbers stored as text.*cast_column\('cls', datasets.Value\('int64'\)\)"):
        hd.check_labels(ds, "cls", 12)
    with pytest.raises(ValueError, match="class_encode_column"):  # class names keep the class_encode advice
        hd.check_labels(datasets.Dataset.from_dict({"cls": ["cat", "dog"]}), "cls", 2)


def test_a_streaming_set_declaring_text_labels_is_refused_before_training() -> None:
    features = datasets.Features({"image": datasets.Image(), "cls": datasets.Value("string")})
    images = [Image.new("RGB", (4, 4))] * 2
    stream = datasets.Dataset.from_dict({"image": images, "cls": ["0", "1"]}, features=features).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"type string, expected integer class ids.*Value\('int64'\)"):
        hd.check_labels(stream, "cls", 10)


def test_detect_columns_prefers_a_column_whose_type_fits() -> None:
    """A 'class' column of names beside a 'target' of ids: the ids are the labels; file names beside images too."""
    ds = datasets.Dataset.from_dict(
        {"image": ["a.png", "b.png"], "img": [Image.new("RGB", (4, 4))] * 2, "class": ["cat", "dog"],
         "target": [0, 1]},
        features=datasets.Features({"image": datasets.Value("string"), "img": datasets.Image(),
                                    "class": datasets.Value("string"), "target": datasets.Value("int64")}))
    assert hd.detect_columns(ds) == ("img", "target")


def test_a_local_copy_of_a_webdataset_hub_set_loads(tmp_path: Path) -> None:
    """The timm/imagenet-1k-wds layout (tar shards of key.jpg + key.cls) copied to disk: not an imagefolder."""
    import tarfile

    def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    for split in ("train", "validation"):
        with tarfile.open(tmp_path / f"imagenet1k-{split}-0000.tar", "w") as tar:
            for i in range(3):
                jpg = io.BytesIO()
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(jpg, "JPEG")
                add(tar, f"{split}_{i}.jpg", jpg.getvalue())
                add(tar, f"{split}_{i}.cls", str(i).encode())
    splits = hd.load_image_dataset(tmp_path)
    assert set(splits) == {"train", "validation"} and len(splits["train"]) == 3
    assert hd.detect_columns(splits["train"]) == ("jpg", "cls")
    stream = hd.load_image_dataset(tmp_path, split="train", streaming=True)  # (imagefolder streamed it as empty)
    assert hd.detect_columns(stream) == ("jpg", "cls") and len(list(stream)) == 3
    assert hd.check_labels(splits["validation"], "cls", 3) == (0, 2)


def test_label_errors_name_the_set_they_are_about(small_model: torch.nn.Module) -> None:
    """A 6-class head, training labels 0..5 and a test split with 0..9: the error must not read as the training set's;
    an unlabelled test split (-1) picked as the eval set is named as the picked split."""
    images = [Image.new("L", (8, 8))] * 10
    train = datasets.Dataset.from_dict({"image": images[:6], "label": list(range(6))})
    test = datasets.Dataset.from_dict({"image": images, "label": list(range(10))})
    model = types.SimpleNamespace(num_classes=6, pretrained_cfg=small_model.pretrained_cfg, in_chans=3)
    with pytest.raises(ValueError, match=r"^the eval set: Labels in column 'label' range over \[0, 9\]"):
        hd.prepare_datasets(model, train, test)
    unlabelled = datasets.Dataset.from_dict({"image": images, "label": [-1] * 10})
    with pytest.raises(ValueError, match=r"^the 'test' split \(the eval set, picked from the DatasetDict"):
        hd.prepare_datasets(model, datasets.DatasetDict(train=train, test=unlabelled))
    with pytest.raises(ValueError, match=r"^split 'test': Labels"):
        hd.check_labels(datasets.DatasetDict(train=train, test=test), "label", 6)
    collator = hd.ImageClassificationCollator(lambda im: torch.zeros(3, 2, 2), num_classes=6)
    with pytest.raises(ValueError, match=r"remove_columns\('label'\)"):  # predict() on an unlabelled split
        collator([{"image": images[0], "label": -1}])


def test_an_eval_set_whose_class_names_differ_is_refused(small_model: torch.nn.Module) -> None:
    """Two imagefolders read separately, the eval one missing a class: 'eel' is id 1 there and 2 in training."""
    image = [Image.new("L", (8, 8))]
    train = datasets.Dataset.from_dict({"image": image * 3, "label": [0, 1, 2]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"])}))
    val = datasets.Dataset.from_dict({"image": image * 2, "label": [0, 1]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "eel"])}))
    model = types.SimpleNamespace(num_classes=3, pretrained_cfg=small_model.pretrained_cfg, in_chans=3)
    with pytest.raises(ValueError, match=r"class names of the eval set \['cat', 'eel'\] differ.*align_labels_with"):
        hd.prepare_datasets(model, train, val)
    aligned = val.align_labels_with_mapping({"cat": 0, "dog": 1, "eel": 2}, "label")
    assert hd.prepare_datasets(model, train, aligned)[1]["label"] == [0, 2]
    with pytest.raises(ValueError, match=r"eval_set.map\(lambda e: .*train_names.index"):  # a stream cannot align
        hd.prepare_datasets(model, train, val.to_iterable_dataset())


def test_whole_number_float_labels_are_told_to_be_cast_not_class_encoded() -> None:
    """class_encode_column stringifies floats: '10.0' sorts before '2.0', renumbering every class past 9."""
    ds = datasets.Dataset.from_dict({"label": [float(i) for i in range(12)]})
    with pytest.raises(ValueError, match=r"whole numbers stored as floats.*cast_column\('label', datasets.Value"):
        hd.check_labels(ds, "label", 12)
    missing = datasets.Dataset.from_dict({"label": [None, None]}, features=datasets.Features(
        {"label": datasets.Value("float64")}))  # a pandas column of NaN: no numbers to cast
    with pytest.raises(ValueError, match=r"has no labels \(all 2 missing\): an unlabelled split"):
        hd.check_labels(missing, "label", 12)
    collator = hd.ImageClassificationCollator(lambda im: torch.zeros(3, 2, 2), num_classes=12)
    with pytest.raises(ValueError, match=r"whole number stored as a float"):
        collator([{"image": np.zeros((4, 4), np.uint8), "label": 3.0}])
    stream = datasets.Dataset.from_dict({"image": [np.zeros((4, 4), np.uint8)], "labels": [[0, 3]]})
    stream = stream.to_iterable_dataset()
    with pytest.raises(ValueError, match="multi-label data is not supported"):  # known from its features: at init
        hd.check_labels(stream, "labels", 10)
