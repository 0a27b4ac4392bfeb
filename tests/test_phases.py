"""The trainer's phase bookkeeping alone: search length, the checkpoint state file and what a resume accepts."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch

import hf_layerfold as lf
from hf_layerfold.phases import (
    FINETUNE,
    SEARCH,
    STATE_NAME,
    PhaseState,
    initial_phase,
    resolve_search_steps,
    restore_phase,
)
from hf_layerfold.plan import applied_plan


def prepared(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("mobilenetv2_035", pretrained=False, num_classes=4)
    return lf.prepare_model(model, lf.LayerFoldingConfig())


def test_search_length_rules(caplog):
    cfg = lf.LayerFoldingConfig
    kwargs = dict(sized=True, steps_per_epoch=8, max_steps=20)
    assert resolve_search_steps(cfg(search_steps=3), SEARCH, None, **kwargs) == 3
    assert resolve_search_steps(cfg(search_epochs=0.5), SEARCH, None, **kwargs) == 4
    assert resolve_search_steps(cfg(), SEARCH, None, **kwargs) == 10  # half of training
    assert resolve_search_steps(cfg(search_steps=3), FINETUNE, None, **kwargs) == 0  # planned: no search
    assert resolve_search_steps(cfg(search_steps=3), FINETUNE, 7, **kwargs) == 7  # the checkpoint's length wins
    with caplog.at_level(logging.WARNING, logger="hf_layerfold.phases"):  # a fixed-plan run (no search) resumed:
        assert resolve_search_steps(cfg(search_steps=3), FINETUNE, 0, **kwargs) == 0  # no warning that 0 ≠ 3
    assert not caplog.text
    with pytest.raises(ValueError, match="search_epochs needs a training set with a length"):
        resolve_search_steps(cfg(search_epochs=1.0), SEARCH, None, sized=False, steps_per_epoch=0, max_steps=20)


def test_state_round_trips_and_a_finetune_checkpoint_replans_a_fresh_model(tmp_path):
    model = prepared()
    plan = lf.FoldPlan(["blocks.1.0.bn1.act", "blocks.2.1.bn2.act"])
    config = model.layerfold_config
    lf.apply_plan(model, plan, config)
    PhaseState(FINETUNE, 6, 8, applied_plan(model)).write(tmp_path, config)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((tmp_path / STATE_NAME).read_text())["phase"] == FINETUNE
    assert PhaseState.read(tmp_path) == PhaseState(FINETUNE, 6, 8, plan)

    fresh = prepared(seed=1)
    assert initial_phase(fresh) == SEARCH
    assert restore_phase(tmp_path, fresh, SEARCH, config) == (FINETUNE, 6)
    assert applied_plan(fresh) == plan and initial_phase(fresh) == FINETUNE
    # the model now has that plan: resuming the same checkpoint again is fine, a search checkpoint is not
    assert restore_phase(tmp_path, fresh, FINETUNE, config) == (FINETUNE, 6)
    PhaseState(SEARCH, 6, 4, None).write(tmp_path / "search", config)
    with pytest.raises(ValueError, match="from the search phase but the model already has a plan"):
        restore_phase(tmp_path / "search", fresh, FINETUNE, config)


def test_a_checkpoint_without_state_keeps_the_phase(tmp_path):
    assert PhaseState.read(tmp_path) is None
    assert restore_phase(tmp_path, prepared(), SEARCH, lf.LayerFoldingConfig()) == (SEARCH, None)


def test_atomic_write_leaves_the_old_file_whole_when_the_write_fails(tmp_path, monkeypatch):
    import os

    from hf_layerfold.files import write_text_atomic

    target = write_text_atomic(tmp_path / "new" / "state.json", "old\n")  # the folder is created
    assert target.read_text() == "old\n"

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n" and sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_concurrent_atomic_writes_of_one_file_do_not_clash(tmp_path):
    """Two writers of the same file (save_on_each_node on a shared disk): every write succeeds, the file holds
    one whole version, and no temporary file is left."""
    from concurrent.futures import ThreadPoolExecutor

    from hf_layerfold.files import write_text_atomic

    target = tmp_path / "state.json"
    texts = {name: name * 1000 + "\n" for name in ("a", "b")}

    def writer(name):
        for _ in range(100):
            write_text_atomic(target, texts[name])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(writer, texts))  # re-raises any writer's error
    assert target.read_text() in texts.values()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_search_shorter_than_half_a_step_warns(caplog):
    config = lf.LayerFoldingConfig(search_epochs=0.01)
    with caplog.at_level(logging.WARNING, logger="hf_layerfold"):
        assert resolve_search_steps(config, SEARCH, None, sized=True, steps_per_epoch=16, max_steps=32) == 0
    assert "less than half an optimizer step" in caplog.text


@pytest.mark.parametrize("text, why", [("{", "not readable"), ("[]", "not a JSON object"),
                                       ('{"phase": "fine-tune"}', "phase 'fine-tune' is none of"),
                                       ('{"phase": "finetune", "plan": null}', "without its plan"),
                                       ('{"phase": "search", "search_steps": -5}', "-5 is not a whole number >= 0")])
def test_an_unreadable_state_file_is_named(tmp_path, text, why):
    (tmp_path / STATE_NAME).write_text(text)
    with pytest.raises(ValueError, match=f"cannot resume from {tmp_path}: its {STATE_NAME} .*{why}"):
        PhaseState.read(tmp_path)
