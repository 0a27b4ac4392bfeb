"""Claims of README.md / examples/README.md that the code must keep."""

import timm
import transformers
from transformers import TrainingArguments

from hf_layerfold import trainer as trainer_module
from hf_layerfold.trainer import LayerFoldingTrainer


def _trainer(out) -> LayerFoldingTrainer:
    args = TrainingArguments(str(out), report_to=[], use_cpu=True)
    return LayerFoldingTrainer(timm.create_model("test_efficientnet", num_classes=3), args)


def test_resume_from_checkpoint_true_as_text_means_the_last_checkpoint(tmp_path, monkeypatch):
    """examples/README.md: ``--resume_from_checkpoint true`` resumes from the last checkpoint. The flag is a str field
    of TrainingArguments, so the scripts hand the trainer the text "true", not a bool."""
    seen = []
    monkeypatch.setattr(transformers.Trainer, "train",
                        lambda self, resume_from_checkpoint=None, **kwargs: seen.append(resume_from_checkpoint))
    monkeypatch.setattr(trainer_module, "restore_phase", lambda checkpoint, model, phase, config: (phase, None))
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    trainer = _trainer(tmp_path)
    trainer.train(resume_from_checkpoint="true")
    trainer.train(resume_from_checkpoint="False")
    assert seen == [str(tmp_path / "checkpoint-4"), None]
