"""``examples/fold_fashion_mnist.py`` in a tiny configuration, and the checks it runs before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import example_module

import hf_layerfold as lf
from hf_layerfold.hub import LayerFoldedModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    with example_module("fold_fashion_mnist") as module:
        yield module


def tiny(out: Path, *extra: str) -> list[str]:
    return ["--model_name", "mobilenetv2_035", "--weights", "none", "--train_size", "20", "--test_size", "10",
            "--input_size", "32", "--max_steps", "2", "--per_device_train_batch_size", "8", "--use_cpu", "true",
            "--lambda_reg", "5", "--alpha_lr", "1.0", "--output_dir", str(out), *extra]


def test_a_tiny_run_saves_a_folded_model_without_a_license_for_random_weights(script, tmp_path):
    summary = script.main(tiny(tmp_path / "run"))
    folded = Path(summary["folded_dir"])
    assert folded == tmp_path / "run" / "folded"
    assert LayerFoldedModel.from_pretrained(folded)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    config = json.loads((folded / "config.json").read_text())
    assert "license" not in config["pretrained_cfg"] and "license:" not in (folded / "README.md").read_text()


def test_distillation_takes_a_folded_save_as_teacher_and_refuses_a_weight_without_one(script, tmp_path, monkeypatch):
    """``--distill_weight`` was offered with no way to give a teacher: it failed after loading data and model."""
    teacher_dir = script.main(tiny(tmp_path / "teacher", "--lambda_reg", "0"))["folded_dir"]
    taught = []
    real_init = script.LayerFoldingTrainer.__init__

    def spy(self, *args, **kwargs):
        taught.append((self, kwargs.get("teacher_model")))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(script.LayerFoldingTrainer, "__init__", spy)
    script.main(tiny(tmp_path / "student", "--distill_weight", "0.5", "--teacher_dir", teacher_dir,
                     "--logging_steps", "1"))
    trainer, teacher = taught[0]
    assert isinstance(teacher, lf.LayerFoldedNet) and teacher.num_classes == 10
    assert all(entry["distill_loss"] > 0 for entry in trainer.state.log_history if "loss" in entry)  # it distilled
    monkeypatch.setattr(script, "load_fashion_mnist", lambda *a, **k: pytest.fail("data loaded before the check"))
    with pytest.raises(ValueError, match="--distill_weight 0.5 needs --teacher_dir"):
        script.main(tiny(tmp_path / "lone", "--distill_weight", "0.5"))


def test_a_folded_dir_holding_other_files_is_refused_before_training(script, tmp_path):
    """The save used overwrite=True: a folder of the user's files (or a file) was replaced after the run."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "results.csv").write_text("a,b\n")
    for target, said in ((mine, r"not a folded-model save; refusing to replace it \(remove it first to replace"),
                         (tmp_path / "results.csv", "is not a directory; remove it first to replace it")):
        with pytest.raises(FileExistsError, match=said):
            script.main(tiny(tmp_path / "run", "--folded_dir", str(target)))
    assert not (tmp_path / "run").exists()  # nothing trained
    assert (mine / "notes.txt").read_text() == "keep me" and (tmp_path / "results.csv").read_text() == "a,b\n"
