"""workflow helpers: a clear error for a dataset too small to split, library-facing device errors."""

import pytest
import timm
import torch
from PIL import Image

import hf_layerfold as lf
from hf_layerfold.cli import main
from hf_layerfold.timing import measure_latency
from hf_layerfold.workflow import CLIError, load_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_image_folder(tmp_path):
    root = tmp_path / "tiny"
    (root / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "cat" / "a.png")
    return root


def test_a_one_row_train_only_dataset_is_refused_in_one_line(tmp_path, capsys):
    root = _one_image_folder(tmp_path)
    with pytest.raises(CLIError, match=r"only a 'train' split, with 1 row\(s\): too small to split") as info:
        load_data(str(root))
    assert info.value.code == 2 and "\n" not in str(info.value) and "evaluation split" in str(info.value)
    code = main(["fold", "--model", "resnet10t", "--no-pretrained", "--dataset", str(root),
                 "--output-dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("hf-layerfold: error: dataset") and "too small to split" in err[-1]
    assert not (tmp_path / "out").exists()


def test_library_timing_on_missing_cuda_raises_a_plain_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    model = timm.create_model("resnet10t", num_classes=4).eval()
    with pytest.raises(RuntimeError, match="CUDA is not available") as info:
        measure_latency({"m": model}, (3, 32, 32), device="cuda")
    assert not isinstance(info.value, CLIError) and "--device" not in str(info.value)
    lf.prepare_model(model)
    with pytest.raises(RuntimeError, match="CUDA is not available") as info:
        lf.measure_fold_gains(model, 32, device="cuda")
    assert not isinstance(info.value, CLIError) and "--device" not in str(info.value)
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        measure_latency({"m": model}, (3, 32, 32), device="gpu0")
    # what cannot time anything is refused as the measurements refuse it (it was a KeyError, a StatisticsError)
    with pytest.raises(ValueError, match="measure_latency: dtype 'float16' is not supported; supported: fp32, bf16"):
        measure_latency({"m": model}, (3, 32, 32), dtype="float16")
    with pytest.raises(ValueError, match="measure_latency: rounds must be a positive integer, got 0"):
        measure_latency({"m": model}, (3, 32, 32), rounds=0)
    # the CLI still names its flag, in one line, with its exit code
    assert main(["gains", "resnet10t", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == ("hf-layerfold: error: --device cuda but CUDA is not available on "
                                              "this machine")


def test_devices_are_checked_against_this_machine(monkeypatch, capsys, tmp_path):
    from hf_layerfold.timing import resolve_device

    with pytest.raises(ValueError, match="there is one CPU device"):
        resolve_device("cpu:1")
    assert str(resolve_device("cpu:0")) == "cpu"  # what fold's use_cpu is decided from (cpu:0 trained on a GPU)
    with pytest.raises(ValueError, match="invalid device ''"):
        resolve_device("")
    with pytest.raises(ValueError, match="supported devices are cpu, cuda, cuda:N and auto$"):
        resolve_device("mps", timing=True)  # timing synchronises CPU and CUDA clocks only
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="this machine has 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.chdir(tmp_path)
    assert main(["fold", "--device", "cuda:1"]) == 2  # Trainer trains on the first visible GPU
    assert "CUDA_VISIBLE_DEVICES=1 and --device cuda" in capsys.readouterr().err


def test_class_folders_named_by_numbers_out_of_order_are_warned(tmp_path, caplog):
    for label in range(12):
        (tmp_path / "test" / str(label)).mkdir(parents=True)
        Image.new("L", (8, 8), label).save(tmp_path / "test" / str(label) / "a.png")
    with caplog.at_level("WARNING"):
        data = load_data(str(tmp_path), need_train=False)
    assert data.label_names[:4] == ["0", "1", "10", "11"]  # as datasets orders them: as text
    assert "class id 2 is the class named '10'" in caplog.text


def test_an_unlabelled_test_split_is_not_chosen_for_evaluation(tmp_path, caplog):
    """A Hub-style set whose test split has -1 for every label: evaluation data is held out of train instead."""
    import datasets

    image = [Image.new("L", (8, 8))]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    root = tmp_path / "hubset" / "data"
    root.mkdir(parents=True)
    datasets.Dataset.from_dict({"image": image * 4, "label": [0, 1, 0, 1]}, features=features).to_parquet(
        root / "train-00000-of-00001.parquet")
    datasets.Dataset.from_dict({"image": image * 2, "label": [-1, -1]}, features=features).to_parquet(
        root / "test-00000-of-00001.parquet")
    with caplog.at_level("WARNING"):
        data = load_data(str(tmp_path / "hubset"))
    assert data.eval_split == "train[held-out]" and "skipping the 'test' split" in caplog.text
    assert "evaluating data held out of 'train' instead" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # evaluation only: the whole training split, said so
        assert load_data(str(tmp_path / "hubset"), need_train=False).eval_split == "train"
    assert "evaluating split 'train' instead" in caplog.text
    assert load_data(str(tmp_path / "hubset"), eval_split="test").eval_split == "test"  # asked for: kept
