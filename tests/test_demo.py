"""``examples/demo.py`` end to end in a tiny configuration: baseline, fold, table, save, reload check."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hf_layerfold.hub import LayerFoldedModel, is_folded_save

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("layerfold_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_help_explains_before_and_after(demo, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "**before** is the baseline" in text and "--no-baseline" in text and "--train-size" in text


def test_demo_tiny_run(demo, tmp_path, capsys):
    out = tmp_path / "outputs" / "folded"
    # 2 steps per run on 64 images at 32 px; λ large and α fast so the one search step folds most sites.
    result = demo.main(["--train-size", "64", "--test-size", "32", "--image-size", "32", "--max-steps", "2",
                        "--batch-size", "16", "--lambda-reg", "10", "--alpha-lr", "1.0", "--latency-rounds", "2",
                        "--large-batch", "4",
                        "--output-dir", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert result["reload_max_abs_diff"] == 0.0  # timm.create_model("local-dir:...") gives identical outputs
    assert result["fold_max_abs_diff"] < 1e-3  # the fold is exact up to float rounding
    assert is_folded_save(out) and Path(result["path"]) == out
    # what DEMO_JSON stores beside the figures: the flags and the environment they were measured in
    assert result["settings"]["image_size"] == 32 and result["environment"]["torch"] == torch.__version__
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded"]  # training scratch removed
    before, after = result["before"], result["after"]
    assert before["accuracy"]["images"] == after["accuracy"]["images"] == 32  # both measured on the same subset
    assert result["linear_sites"] and after["depth"] < before["depth"]
    assert after["nonlinear_layers"] == before["nonlinear_layers"] - len(result["linear_sites"])
    assert min(before["latency_ms"], after["latency_ms"], before["large_batch_latency_ms"],
               after["large_batch_latency_ms"]) > 0
    for label in ("before: fine-tuned, no folding (BN fused)", "after: layer-folded", "latency, batch 1",
                  "latency, batch 4", "top-1, Fashion-MNIST test (32 images)", "(identical)"):
        assert label in printed
    card = (out / "README.md").read_text()
    assert "Measured latency" in card and "Measured accuracy" in card and "Before folding" in card
    net = LayerFoldedModel.from_pretrained(out)
    assert net.pretrained_cfg["input_size"] == [3, 32, 32]
    assert len(net.layerfold_info["plan"]["linear_sites"]) == len(result["linear_sites"])


def test_an_output_dir_the_save_would_refuse_is_refused_before_training(demo, tmp_path):
    """The check at the start let through a folded save holding other files (refused only by the save, after the
    whole training) and a file (a NotADirectoryError traceback)."""
    save = tmp_path / "save"
    save.mkdir()
    (save / "config.json").write_text(json.dumps({"architecture": "layerfold_net", "layerfold": {}}))
    (save / "notes.txt").write_text("keep me")
    (tmp_path / "afile.txt").write_text("x")
    for target, said in ((save, r"also \['notes.txt'\]"), (tmp_path / "afile.txt", "is not a directory")):
        with pytest.raises(SystemExit, match=f"demo.py: error: .*{said}.*pick another --output-dir"):
            demo.main(["--output-dir", str(target), "--quiet"])
    assert (save / "notes.txt").read_text() == "keep me"
