"""``examples/fold_imagenet.py``, the ImageNet recipe, run end to end on a small local imagefolder of real images.

The recipe itself needs ImageNet and GPUs; what runs here is every line of the script in the same modes: a
streamed training set whose epochs become steps through ``--num_train_examples``, the search + fine-tune run
that saves a folded model, and the two-run recipe (search only, then ``--init_from`` to fine-tune the plan).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import example_module

import hf_layerfold as lf
from hf_layerfold.data import load_fashion_mnist
from hf_layerfold.hub import LayerFoldedModel, is_folded_save

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "fold_imagenet.py"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    with example_module("fold_imagenet") as module:
        yield module


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    """Fashion-MNIST images as ``train/<class>/*.png`` and ``validation/<class>/*.png`` (the ImageNet splits)."""
    root = tmp_path_factory.mktemp("imagefolder")
    data = load_fashion_mnist(train_size=40, test_size=16, seed=0)
    names = data["train"].features["label"].names
    for split, folder in (("train", "train"), ("test", "validation")):
        for i, row in enumerate(data[split]):
            target = root / folder / names[row["label"]].replace("/", "-")
            target.mkdir(parents=True, exist_ok=True)
            row["image"].save(target / f"{i}.png")
    return root


def common(root: Path, out: Path) -> list[str]:
    return ["--model_name", "mobilenetv2_035", "--pretrained", "false", "--dataset_name", str(root),
            "--input_size", "32", "--max_eval_samples", "16", "--output_dir", str(out),
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--warmup_steps", "0",
            "--dataloader_num_workers", "0", "--eval_strategy", "no", "--save_strategy", "no",
            "--logging_steps", "5", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
            "--lambda_reg", "5", "--alpha_lr", "1.0", "--seed", "0"]


def test_streamed_run_turns_epochs_into_steps_and_saves_a_folded_model(script, imagefolder, tmp_path):
    out = tmp_path / "run"
    metrics = script.main(common(imagefolder, out) + [
        "--streaming", "true", "--num_train_examples", "40", "--num_train_epochs", "2", "--search_epochs", "1"])
    state = json.loads((out / "layerfold_state.json").read_text())
    assert state["global_step"] == 10 and state["search_steps"] == 5  # 2 epochs of ceil(40 / 8) steps, search 1
    assert state["phase"] == "finetune" and state["plan"]["linear_sites"]
    assert 0.0 <= metrics["eval_top1"] <= metrics["eval_top5"] <= 1.0
    folded = out / "folded"
    assert is_folded_save(folded)
    model = LayerFoldedModel.from_pretrained(folded)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # the folder's classes (a 1000-way head before)
    config = json.loads((folded / "config.json").read_text())
    assert config["label_names"][:2] == ["Ankle boot", "Bag"]  # imagefolder's (sorted) class names, carded
    card = (folded / "README.md").read_text()
    # random weights carry timm's pretrained cfg, license included, and a local folder is no Hub dataset: neither
    # reaches the card's metadata (they used to: license apache-2.0, datasets: the folder's path)
    assert "license" not in config["pretrained_cfg"] and "license:" not in card and str(imagefolder) not in card


def test_what_the_end_of_a_run_needs_is_checked_before_it_starts(script, imagefolder, tmp_path):
    """--folded_dir used to be saved with overwrite=True (a folder of the user's files, a file, the run's own
    output_dir: replaced after the run), and a malformed --push_folded_to failed only after the whole training."""
    out, mine = tmp_path / "run", tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for extra, error, said in (
            (["--folded_dir", str(mine)], FileExistsError, "non-empty directory that is not a folded-model save"),
            (["--folded_dir", str(out)], FileExistsError, "where the run writes its checkpoints"),
            (["--folded_dir", str(tmp_path)], FileExistsError, "where the run writes its checkpoints"),
            (["--push_folded_to", "not a valid/repo id!"], ValueError, "--push_folded_to 'not a valid/repo id!'")):
        with pytest.raises(error, match=said):
            script.main(common(imagefolder, out) + ["--streaming", "false", "--max_steps", "2", *extra])
        assert not out.exists()  # refused before any training
    assert (mine / "notes.txt").read_text() == "keep me"


def test_one_json_file_holds_the_flags(script, tmp_path):
    """HfArgumentParser's convention, over the script's own defaults."""
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"model_name": "resnet18", "lambda_reg": 0.5, "output_dir": str(tmp_path / "o")}))
    args, config, training = script.parse([str(path)])
    assert (args.model_name, config.lambda_reg, training.output_dir) == ("resnet18", 0.5, str(tmp_path / "o"))
    assert (config.regularizer, training.lr_scheduler_type.value) == ("l1", "cosine")  # the script's defaults


def test_folding_flags_say_what_they_do_and_take_none(script, capsys):
    """HfArgumentParser gave the LayerFoldingConfig flags no help, no choices, and no way to unset alpha_lr."""
    with pytest.raises(SystemExit):
        script.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--regularizer {paper,l1}" in text and "weight λ of the α regularizer" in text
    assert "(default: 0.25)" in text  # the script's own λ
    assert "--no_fold_residual, --no-fold-residual set fold_residual to False (see --fold_residual)" in text
    args, config, _ = script.parse(["--alpha_lr", "none", "--max_macs_increase", "none", "--output_dir", "o"])
    assert config.alpha_lr is None and config.max_macs_increase is None
    with pytest.raises(SystemExit):
        script.parse(["--regularizer", "L1", "--output_dir", "o"])
    assert "invalid choice: 'L1'" in capsys.readouterr().err


def test_search_run_then_init_from_fine_tunes_its_plan(script, imagefolder, tmp_path):
    search = tmp_path / "search"
    script.main(common(imagefolder, search) + ["--streaming", "false", "--max_steps", "4", "--search_steps", "4"])
    searched = json.loads((search / "layerfold_state.json").read_text())
    # without DeepSpeed the trainer fixes the plan when a search that covers all steps ends (DeepSpeed leaves
    # it to run 2)
    assert searched["phase"] == "finetune" and searched["search_steps"] == searched["global_step"] == 4
    assert searched["plan"]["linear_sites"]

    tuned = tmp_path / "finetune"
    script.main(common(imagefolder, tuned) + ["--streaming", "false", "--max_steps", "2", "--init_from",
                                                str(search)])
    state = json.loads((tuned / "layerfold_state.json").read_text())
    assert state["phase"] == "finetune" and state["search_steps"] == 0 and state["global_step"] == 2
    assert state["plan"] == searched["plan"]  # the plan comes from the search run's α
    assert is_folded_save(tuned / "folded")
    with pytest.raises(ValueError, match="is a folded save; give the run's output_dir"):
        script.main(common(imagefolder, tmp_path / "x") + ["--max_steps", "2", "--init_from", str(tuned / "folded")])
    with pytest.raises(ValueError, match=r"trained with other sites \(exclude_modules: \[\] there, \['bn1.act'\] here"):
        script.main(common(imagefolder, tmp_path / "x") + ["--max_steps", "2", "--init_from", str(search),
                                                           "--exclude_modules", "bn1.act"])


def test_a_fixed_plan_skips_the_search(script, imagefolder, tmp_path):
    out = tmp_path / "plan"
    script.main(common(imagefolder, out) + ["--streaming", "false", "--max_steps", "2", "--plan",
                                            "blocks.1.1,blocks.2.0.bn1.act"])
    state = json.loads((out / "layerfold_state.json").read_text())
    assert state["phase"] == "finetune" and state["search_steps"] == 0 and state["global_step"] == 2
    assert state["plan"]["linear_sites"] == ["blocks.1.1.bn1.act", "blocks.1.1.bn2.act", "blocks.2.0.bn1.act"]
    assert is_folded_save(out / "folded")
    with pytest.raises(ValueError, match="give one of them"):
        script.main(common(imagefolder, out) + ["--plan", "blocks.1.1", "--init_from", str(out)])
    again = tmp_path / "again"  # a run started from a fixed plan's run: no search behind its card either
    script.main(common(imagefolder, again) + ["--streaming", "false", "--max_steps", "1", "--init_from", str(out)])
    assert "chosen before training (a fixed plan, not searched)" in (again / "folded" / "README.md").read_text()
    # streamed from a folder whose size nothing has recorded: a fixed plan has no search to size (it was refused,
    # "give --search_steps", as the default search_epochs was turned into steps before the plan zeroed them)
    fresh = shutil.copytree(imagefolder, tmp_path / "unsized")
    streamed = tmp_path / "streamed"
    script.main(common(fresh, streamed) + ["--streaming", "true", "--max_steps", "1", "--plan", "blocks.1.1"])
    assert json.loads((streamed / "layerfold_state.json").read_text())["search_steps"] == 0


def test_streamed_size_defaults_to_the_split_info(script, imagefolder, tmp_path):
    from hf_layerfold.data import load_image_dataset

    # a streamed local folder knows its split sizes once a full load has recorded them in the cache (a Hub dataset
    # from its card); without them the script asks for a length (a copy of the folder: nothing recorded yet)
    fresh = shutil.copytree(imagefolder, tmp_path / "images")
    flags = ["--streaming", "true", "--num_train_epochs", "1", "--search_steps", "3"]
    with pytest.raises(ValueError, match="streaming needs --max_steps or --num_train_examples"):
        script.main(common(fresh, tmp_path / "unsized") + flags)
    load_image_dataset(str(fresh), split="train")
    out = tmp_path / "run"  # no --num_train_examples: the 40 images the split info records, 5 steps per epoch
    script.main(common(fresh, out) + flags)
    state = json.loads((out / "layerfold_state.json").read_text())
    assert state["global_step"] == 5 and state["search_steps"] == 3


@pytest.mark.slow
def test_the_recipe_runs_under_accelerate_launch_on_two_processes(imagefolder, tmp_path):
    """The README's ``accelerate launch`` command, on 2 CPU processes (gloo) instead of 8 GPUs: a streamed epoch is
    counted over both processes, the search hands over to the fine-tune, and the folded save computes what the
    saved planned model computes."""
    import timm
    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29000 + os.getpid() % 500), str(SCRIPT), *common(imagefolder, out),
           "--streaming", "true", "--num_train_examples", "40", "--num_train_epochs", "1", "--search_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    state = json.loads((out / "layerfold_state.json").read_text())
    assert state["global_step"] == 3 and state["search_steps"] == 2  # ceil(40 / (8 per process x 2 processes))
    assert state["phase"] == "finetune" and state["plan"]["linear_sites"]
    planned = lf.prepare_model(timm.create_model("mobilenetv2_035", num_classes=10),
                               lf.LayerFoldingConfig.from_pretrained(out))
    lf.apply_plan(planned, lf.FoldPlan.from_dict(state["plan"]))
    planned.load_state_dict(load_file(out / "model.safetensors"))
    folded = LayerFoldedModel.from_pretrained(out / "folded")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), planned.eval()(x), rtol=1e-4, atol=1e-4)
