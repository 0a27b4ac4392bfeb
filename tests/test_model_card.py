"""The model card's metadata parses back with huggingface_hub, whatever kind of number or tag it was given."""

import math
import re

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import EvalResult, ModelCard, metadata_load

import hf_layerfold as lf
from hf_layerfold.hub import save_folded
from hf_layerfold.model_card import latency_section, render_card

# The measured block of a (tiny) folded save, as save_folded builds it.
INFO = {"stats_input_size": [3, 32, 32], "plan": {"linear_sites": ["blocks.1.0.bn1.act"]},
        "stats_after": {"nonlinear_layers": 3, "depth": 5, "convs": 5, "params": 1234, "macs": 56789}}


def _saved(tmp_path, **kwargs) -> tuple[ModelCard, dict]:
    card = render_card(INFO, load_id="org/folded", is_hub=True, title="folded", **kwargs)
    card.save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md"), metadata_load(tmp_path / "README.md")


@pytest.mark.parametrize("score", [np.float64(0.875), np.float32(0.875), torch.tensor(0.875)],
                         ids=["numpy64", "numpy32", "torch"])
def test_array_scalar_metrics_are_written_as_plain_yaml_numbers(tmp_path, score):
    card, meta = _saved(tmp_path, eval_results=[
        {"dataset": "zalando-datasets/fashion_mnist", "split": "test", "metrics": {"top1": score}},
        EvalResult(task_type="image-classification", dataset_type="d", dataset_name="D", metric_type="top5",
                   metric_value=score)])
    values = [m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]]
    assert values == [0.875, 0.875] and all(type(v) is float for v in values)
    assert [r.metric_value for r in card.data.eval_results] == [0.875, 0.875]
    assert "python/object" not in card.content


@pytest.mark.parametrize("score", [None, math.nan, math.inf])
def test_a_metric_nobody_measured_is_refused(score):
    with pytest.raises(ValueError, match="eval_results"):
        render_card(INFO, load_id="org/folded", is_hub=True, title="folded",
                    eval_results={"dataset": "d", "metrics": {"top1": score}})


def test_a_single_tag_string_is_one_tag(tmp_path):
    _, meta = _saved(tmp_path, tags="fashion")
    assert meta["tags"] == ["layer-folding", "image-classification", "timm", "fashion"]


@pytest.mark.parametrize("after", [0.0, -1.0, math.nan])
def test_latency_that_is_not_a_measurement_is_refused(after):
    with pytest.raises(ValueError, match="positive milliseconds"):
        latency_section({"before_ms": 2.0, "after_ms": after, "device": "cpu", "batch_size": 1, "dtype": "fp32"})


def _listed_activations(section: str) -> list[str]:
    """The activation names in the 'Activations removed' column of every table row of ``section``."""
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    return [name for cols in rows for name in re.findall(r"`([^`]+)`", cols[1])]


def test_activations_removed_where_a_merge_was_split_are_on_the_card(tmp_path):
    torch.manual_seed(0)
    model = lf.prepare_model(timm.create_model("resnet10t", num_classes=5).eval(),
                             lf.LayerFoldingConfig(max_kernel_size=5))
    sites = lf.foldable_sites(model)
    planned = lf.apply_plan(model, lf.FoldPlan(tuple(sites)))  # 7×7 merges split: 4 sites sit in no merge
    path = save_folded(planned, tmp_path / "split", pretrained_cfg_overlay={"input_size": (3, 32, 32)})
    text = ModelCard.load(path / "README.md").text
    section = text[text.index("## What was folded"):text.index("## Depth and cost")]
    assert f"2 merged convolutions, {len(sites)} activations removed." in section
    assert len(_listed_activations(section)) == len(sites) == 6
    assert "4 of the removed activations sit where a merge was split" in section
    assert "| `layer2` | `0.act1` |" in section and "| `conv1` | `2` |" in section


def test_a_plan_whose_every_merge_is_split_says_nothing_merged(tmp_path):
    """With no merge left the card said each removed activation let the convs around it fold into one."""
    torch.manual_seed(0)
    model = lf.prepare_model(timm.create_model("resnet18", num_classes=4).eval(),
                             lf.LayerFoldingConfig(max_kernel_size=3))
    planned = lf.apply_plan(model, lf.FoldPlan.from_blocks(model, ["layer1.0", "layer2.0"]))
    text = (save_folded(planned, tmp_path / "s", pretrained_cfg_overlay={"input_size": (3, 32, 32)}) /
            "README.md").read_text()
    section = text[text.index("## What was folded"):text.index("## Depth and cost")]
    assert "0 merged convolutions, 2 activations removed." in section
    assert "2 of the removed activations sit where a merge was split" in section
    assert "| Block | Activations removed | Convolutions merged |" not in section


@pytest.mark.parametrize("global_pool", ["avg", ""])
def test_a_feature_extractor_card_has_no_classifier_snippets(tmp_path, global_pool):
    """A folded net without a head was carded as an image classifier: its transformers snippet failed (no head)."""
    from PIL import Image

    torch.manual_seed(0)
    model = lf.prepare_model(timm.create_model("mobilenetv2_050", num_classes=0, global_pool=global_pool).eval())
    folded = lf.fold_model(lf.apply_plan(model, lf.FoldPlan.from_blocks(model, ["blocks.1.1"])))
    path = save_folded(folded, tmp_path / "features", pretrained_cfg_overlay={"input_size": (3, 32, 32)})
    card = ModelCard.load(path / "README.md")
    assert card.data.pipeline_tag == "image-feature-extraction" and "image-classification" not in card.data.tags
    assert "pipeline(" not in card.text and "AutoModelForImageClassification" not in card.text
    image = Image.fromarray((np.random.default_rng(0).random((40, 36)) * 255).astype("uint8"))  # (a gray image:
    scopes = []                                                       # the timm snippet failed on it, unconverted)
    for snippet in re.findall(r"```python\n(.*?)```", card.text, re.S):  # each runs as pasted
        scopes.append({"image": image})
        exec(snippet, scopes[-1])  # noqa: S102 - the card's own snippets, against the local save
    timm_scope, transformers_scope, _ = scopes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert timm_scope["features"].shape[:2] == (1, folded.num_features)
        torch.testing.assert_close(transformers_scope["model"](pixel_values=x).last_hidden_state,
                                   folded.forward_features(x))


def test_a_training_run_card_rebuilds_the_models_input_channels():
    from hf_layerfold.model_card import training_run_card

    card = training_run_card("org/run", "mobilenetv2_035", 10, "finetune", 4, 34, in_chans=1)
    assert 'timm.create_model("mobilenetv2_035", num_classes=10, in_chans=1)' in card  # (its first conv's shape)
    assert "in_chans" not in training_run_card("org/run", "mobilenetv2_035", 10, "search", None, 34)


def test_an_accuracy_measured_on_some_images_says_how_many():
    from hf_layerfold.model_card import accuracy_section

    section = accuracy_section({"after": 0.5, "split": "test", "dataset": "org/data", "images": 32})
    assert section["setting"] == "Top-1 accuracy on the `test` split of `org/data` (32 images)."


def test_a_four_channel_classifier_card_offers_no_rgb_pipeline(tmp_path):
    """transformers' pipeline converts every image to RGB: its snippet failed for 2- and 4-channel models."""
    from PIL import Image

    torch.manual_seed(0)
    model = lf.prepare_model(timm.create_model("mobilenetv2_050", num_classes=3, in_chans=4).eval())
    folded = lf.fold_model(lf.apply_plan(model, lf.FoldPlan.from_blocks(model, ["blocks.1.1"])))
    path = save_folded(folded, tmp_path / "rgba", pretrained_cfg_overlay={"input_size": (4, 32, 32), "mean": (0.5,) * 4,
                                                                  "std": (0.25,) * 4})
    card = ModelCard.load(path / "README.md").text
    assert "pipeline(" not in card and "This model takes 4-channel (RGBA) images" in " ".join(card.split())
    scope = {"image": Image.new("RGB", (40, 36), (10, 200, 30))}
    exec(re.findall(r"```python\n(.*?)```", card, re.S)[0], scope)  # noqa: S102 - the card's timm snippet
    assert scope["logits"].shape == (1, 3)
