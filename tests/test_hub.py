"""save_folded / push / load through timm, transformers and LayerFoldedModel, against a local Hub (offline-safe)."""

import copy
import json
import os
import shutil
from pathlib import Path

import hub_server  # tests/ is on sys.path (rootdir-relative, no __init__.py)
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from conftest import randomize_bn
from huggingface_hub import ModelCard
from PIL import Image

import hf_layerfold as lf
from hf_layerfold.hub import LayerFoldedModel, PushToHubError, is_folded_save, save_folded
from hf_layerfold.model_card import template_path

local_hub = hub_server.local_hub  # make the fixture visible to this module

REPO = "test-org/mobilenetv2-folded"
LABELS = ["ankle boot", "bag", "coat", "dress"]
SAVE_FILES = {"model.safetensors", "config.json", "layerfold_config.json", "layerfold_plan.json", "README.md"}
# Trained at 64 px: recorded preprocessing, and what fold_stats counts MACs at (keeps the tests fast).
SAVE_KW = dict(label_names=LABELS, pretrained_cfg_overlay={"input_size": (3, 64, 64)})
MEASURED = dict(
    base_model="timm/mobilenetv2_050.lamb_in1k", datasets=["fashion_mnist"], license="apache-2.0",
    latency={"before_ms": 4.25, "after_ms": 3.5, "device": "Intel Xeon (2 threads)", "batch_size": 8,
             "dtype": "float32"},
    accuracy={"before": 0.9125, "after": 0.9075, "split": "test", "dataset": "fashion_mnist"},
    eval_results={"dataset": "fashion_mnist", "dataset_name": "Fashion-MNIST", "split": "test",
                  "metrics": {"accuracy": 0.9075}},
)


def _mobilenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(timm.create_model("mobilenetv2_050", num_classes=4)).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planned():
    model = lf.prepare_model(_mobilenet(), lf.LayerFoldingConfig(lambda_reg=0.5, threshold=0.8))
    return lf.apply_plan(model, lf.FoldPlan.from_blocks(model, ["blocks.1.1", "blocks.3.0"]))


@pytest.fixture(scope="module")
def folded(planned):
    return lf.fold_model(planned)


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # the shape fold_stats runs


@pytest.fixture(scope="module")
def saved(planned, tmp_path_factory):
    """One local save of the planned model, with every measured card field."""
    return save_folded(planned, tmp_path_factory.mktemp("saves") / "folded", **SAVE_KW, **MEASURED)


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((48, 40, 3)) * 255).astype("uint8"))


# ---------------------------------------------------------------------------------------------------------
# End to end against the local Hub


def test_push_then_load_from_hub(local_hub, tmp_path, planned, folded, x):
    path = save_folded(folded, tmp_path / "folded", push_to_hub=True, repo_id=REPO, config=planned.layerfold_config,
                       **SAVE_KW, **MEASURED)
    assert path == tmp_path / "folded" and {p.name for p in path.iterdir()} == SAVE_FILES
    repo = local_hub.repos[REPO]
    assert SAVE_FILES <= set(repo.files) and len(repo.history) == 2  # initial commit + exactly one upload
    assert repo.files["model.safetensors"] == (path / "model.safetensors").read_bytes()

    model = timm.create_model(f"hf-hub:{REPO}", pretrained=True)
    assert isinstance(model, lf.LayerFoldedNet)
    assert torch.equal(_out(model, x), _out(folded, x))
    assert model.pretrained_cfg["hf_hub_id"] == REPO and model.pretrained_cfg["input_size"] == (3, 64, 64)
    assert model.layerfold_info["plan"] == planned.layerfold_plan.to_dict()

    ours = LayerFoldedModel.from_pretrained(REPO)
    assert torch.equal(_out(ours, x), _out(folded, x))
    assert ours.layerfold_plan == planned.layerfold_plan and ours.layerfold_config.threshold == 0.8
    assert ours.pretrained_cfg["label_names"] == LABELS

    from transformers import AutoModelForImageClassification

    hf_model = AutoModelForImageClassification.from_pretrained(REPO).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(pixel_values=x).logits, _out(folded, x))
    # Only the folded repo was read: no base model, no base weights.
    downloads = [r.path for r in local_hub.requests if "/resolve/" in r.path]
    assert downloads and all(f"/{REPO}/resolve/" in p for p in downloads)
    card = ModelCard(repo.files["README.md"].decode())
    assert f'timm.create_model("hf-hub:{REPO}", pretrained=True)' in card.text
    assert f'pipeline("image-classification", model="{REPO}")' in card.text


def test_a_push_replaces_what_a_previous_push_wrote(local_hub, tmp_path, planned, folded):
    """A folded net's save has no layerfold_config.json: the one a previous push of the planned model left stayed
    in the repo, contradicting config.json. Files of the user's in the repo are kept."""
    save_folded(planned, tmp_path / "a", push_to_hub=True, repo_id=REPO, **SAVE_KW)
    local_hub.api().upload_file(path_or_fileobj=b"mine", path_in_repo="NOTES.md", repo_id=REPO)
    assert "layerfold_config.json" in local_hub.repos[REPO].files
    save_folded(folded, tmp_path / "b", push_to_hub=True, repo_id=REPO, **SAVE_KW)
    assert set(local_hub.repos[REPO].files) == {".gitattributes", "NOTES.md"} | SAVE_FILES - {"layerfold_config.json"}
    with pytest.raises(TypeError, match=r"takes no \['push_to_hub'\]"):  # it used to push publicly first
        LayerFoldedModel.push_to_hub(folded, REPO, private=True, push_to_hub=True)


def test_a_push_to_a_branch_and_over_another_models_processor_config(local_hub, tmp_path, folded, x):
    """revision= was refused as an unknown card field; a preprocessor_config.json another model left in the repo made
    transformers' pipeline preprocess at 224 px with that model's mean / std."""
    from transformers import AutoImageProcessor

    local_hub.create_repo(REPO)
    local_hub.api().upload_file(path_or_fileobj=b'{"image_processor_type": "ViTImageProcessor"}',
                                path_in_repo="preprocessor_config.json", repo_id=REPO)
    save_folded(folded, tmp_path / "a", push_to_hub=True, repo_id=REPO, revision="folded", **SAVE_KW)
    assert "preprocessor_config.json" in local_hub.repos[REPO].files  # main untouched
    assert "preprocessor_config.json" not in local_hub.repos[REPO].resolve("folded").files
    card = local_hub.repos[REPO].resolve("folded").files["README.md"].decode()  # the snippets load that branch
    assert f'create_model("hf-hub:{REPO}@folded"' in card and f'from_pretrained("{REPO}", revision="folded")' in card
    assert torch.equal(_out(LayerFoldedModel.from_pretrained(REPO, revision="folded"), x), _out(folded, x))
    assert type(AutoImageProcessor.from_pretrained(REPO, revision="folded")).__name__ == "TimmWrapperImageProcessor"
    with pytest.raises(ValueError, match="pull request against the default branch"):
        save_folded(folded, tmp_path / "b", push_to_hub=True, repo_id=REPO, revision="folded", create_pr=True)
    with pytest.raises(ValueError, match="push settings"):
        save_folded(folded, tmp_path / "b", revision="folded")
    with pytest.raises(FileNotFoundError, match="not a directory holding a folded-model save"):  # a Path: a folder
        LayerFoldedModel.from_pretrained(tmp_path / "missing" / "x")
    with pytest.raises(FileNotFoundError, match="'outputs/lite0-foldd' is neither a local directory"):
        LayerFoldedModel.from_pretrained("outputs/lite0-foldd", local_files_only=True)  # (as offline)


def test_a_pull_request_and_a_push_to_its_ref(local_hub, tmp_path, planned, folded, x, caplog):
    """create_pr=True opens a pull request whose card loads the default branch (where it merges); a push to its
    refs/pr/N commits there, without asking for a branch of that name (the Hub refuses to create one)."""
    save_folded(planned, tmp_path / "a", push_to_hub=True, repo_id=REPO, **SAVE_KW)
    with caplog.at_level("INFO", logger="hf_layerfold.hub"):
        save_folded(folded, tmp_path / "b", push_to_hub=True, repo_id=REPO, create_pr=True, **SAVE_KW)
    repo = local_hub.repos[REPO]
    assert "layerfold_config.json" in repo.files and "layerfold_config.json" not in repo.resolve("refs/pr/1").files
    assert f"{REPO}/discussions/1" in caplog.text  # the pull request's address is told
    with caplog.at_level("INFO", logger="hf_layerfold.hub"):  # nothing to change: no pull request, and it is said
        save_folded(planned, tmp_path / "same", push_to_hub=True, repo_id=REPO, create_pr=True, **SAVE_KW)
    assert "no pull request opened" in caplog.text and "refs/pr/2" not in local_hub.repos[REPO].branches
    card = repo.resolve("refs/pr/1").files["README.md"].decode()
    assert f'create_model("hf-hub:{REPO}", pretrained=True)' in card
    local_hub.requests.clear()
    save_folded(folded, tmp_path / "c", push_to_hub=True, repo_id=REPO, revision="refs/pr/1",
                **{**SAVE_KW, "label_names": LABELS[::-1]})
    assert not [r for r in local_hub.requests if "/branch/" in r.path]
    assert sorted(repo.branches) == ["main", "refs/pr/1"]
    card = repo.resolve("refs/pr/1").files["README.md"].decode()
    assert f'create_model("hf-hub:{REPO}@refs/pr/1"' in card
    assert torch.equal(_out(LayerFoldedModel.from_pretrained(REPO, revision="refs/pr/1"), x), _out(folded, x))


def test_failed_push_keeps_the_local_save(local_hub, tmp_path, folded, x):
    target = tmp_path / "folded"
    local_hub.fail_next_commit = True
    with pytest.raises(PushToHubError) as err:
        save_folded(folded, target, push_to_hub=True, repo_id=REPO, **SAVE_KW)
    assert str(target) in str(err.value) and err.value.save_directory == target
    assert "507" in str(err.value)
    assert "model.safetensors" not in local_hub.repos[REPO].files  # repo created, nothing committed
    assert is_folded_save(target) and {p.name for p in target.iterdir()} == SAVE_FILES - {"layerfold_config.json"}
    assert torch.equal(_out(LayerFoldedModel.from_pretrained(target), x), _out(folded, x))
    # a retry replaces the previous save and goes through
    save_folded(folded, target, push_to_hub=True, repo_id=REPO, **SAVE_KW)
    assert local_hub.repos[REPO].files["model.safetensors"] == (target / "model.safetensors").read_bytes()


def test_layerfold_model_push_to_hub(local_hub, folded, x, monkeypatch):
    with pytest.raises(PushToHubError, match="401"):  # an explicit token wins over HF_TOKEN
        LayerFoldedModel.push_to_hub(folded, REPO, token="hf_wrong_token", **SAVE_KW)
    # HF_ENDPOINT is read at call time (huggingface_hub copies it once, at import)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    url = LayerFoldedModel.push_to_hub(folded, REPO, **SAVE_KW)
    monkeypatch.undo()
    files = local_hub.repos[REPO].files
    assert url.startswith(local_hub.url) and SAVE_FILES - {"layerfold_config.json"} <= set(files)
    assert f'model = LayerFoldedModel.from_pretrained("{REPO}")' in files["README.md"].decode()  # no temp path
    assert torch.equal(_out(LayerFoldedModel.from_pretrained(f"hf-hub:{REPO}"), x), _out(folded, x))
    # to a branch: the card loads that branch, as save_folded(push_to_hub=True, revision=...) writes it
    LayerFoldedModel.push_to_hub(folded, REPO, revision="dev", **{**SAVE_KW, "label_names": LABELS[::-1]})
    card = local_hub.repos[REPO].resolve("dev").files["README.md"].decode()
    assert f'create_model("hf-hub:{REPO}@dev", pretrained=True)' in card
    assert f'LayerFoldedModel.from_pretrained("{REPO}", revision="dev")' in card


# ---------------------------------------------------------------------------------------------------------
# Local loading


def test_local_dir_save_loads_identically(saved, folded, x):
    model = timm.create_model(f"local-dir:{saved}", pretrained=True)
    assert torch.equal(_out(model, x), _out(folded, x))
    ours = LayerFoldedModel.from_pretrained(saved)
    assert torch.equal(_out(ours, x), _out(folded, x))
    assert ours.pretrained_cfg["source"] == "local-dir" and ours.layerfold_info["stats_after"]["depth"] == 48


def test_a_float64_save_reloads_in_float64_exactly(tmp_path, planned, folded, x):
    path = save_folded(planned.double(), tmp_path / "f64")
    planned.float()  # (the module fixture, back as it was)
    ours = LayerFoldedModel.from_pretrained(path)
    assert {p.dtype for p in ours.parameters()} == {torch.float64}  # (timm.create_model builds float32, as always)
    expected = lf.fold_model(planned.double())(x.double())
    planned.float()
    with torch.no_grad():
        assert torch.equal(ours.eval()(x.double()), expected)


def test_config_json_is_a_timm_config(saved, planned, folded):
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["architecture"] == "layerfold_net" and cfg["num_classes"] == 4 and cfg["label_names"] == LABELS
    assert "num_classes" not in cfg["model_args"]  # transformers passes num_classes itself
    assert cfg["model_args"]["features"] == folded.model_args["features"]
    pcfg = cfg["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 64, 64] and pcfg["interpolation"] == "bicubic"
    assert pcfg["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN) and pcfg["crop_pct"] == 0.875
    assert not {"url", "hf_hub_id", "file", "source", "tag"} & set(pcfg)  # nothing points at base weights
    timm.models.PretrainedCfg(**pcfg)  # loadable by timm
    block = cfg["layerfold"]
    assert block == cfg["model_args"]["layerfold"]
    assert block["plan"] == planned.layerfold_plan.to_dict() and block["config"]["lambda_reg"] == 0.5
    assert block["base_architecture"] == "mobilenetv2_050"
    # "before" is the base network itself (padding moved back, activations restored): count a fresh one
    assert block["stats_before"] == lf.fold_stats(_mobilenet(), (3, 64, 64)).to_dict()
    assert block["stats_after"] == lf.fold_stats(folded, (3, 64, 64)).to_dict()
    assert [(r["block"], r["kernel"], r["residual_absorbed"]) for r in block["folds"]] == [
        ("blocks.1.1", [3, 3], True), ("blocks.3.0", [3, 3], False)]
    assert block["folds"][0]["activations_removed"] == ["blocks.1.1.bn1.act", "blocks.1.1.bn2.act"]
    assert lf.LayerFoldingConfig.from_pretrained(saved).threshold == 0.8
    assert lf.FoldPlan.load(saved) == planned.layerfold_plan


def test_a_one_channel_model_saves_a_one_channel_config(tmp_path):
    """timm keeps the pretrained (3, H, W) and RGB mean / std in the config of an ``in_chans=1`` model: the save
    failed counting its MACs on 3 channels. It now writes one channel, and the reload preprocesses a gray image."""
    from hf_layerfold.collate import build_transforms

    torch.manual_seed(0)
    model = lf.prepare_model(timm.create_model("mobilenetv2_035", num_classes=4, in_chans=1), lf.LayerFoldingConfig())
    lf.apply_plan(model, lf.FoldPlan.from_blocks(model, ["blocks.1.1"]))
    path = lf.save_folded(model, tmp_path / "gray")
    pcfg = json.loads((path / "config.json").read_text())["pretrained_cfg"]
    assert pcfg["input_size"] == [1, 224, 224] and len(pcfg["mean"]) == len(pcfg["std"]) == 1
    card = (path / "README.md").read_text()  # transformers' pipeline converts images to RGB: not offered
    assert "pipeline(" not in card and "This model takes one-channel (grayscale) images" in " ".join(card.split())
    loaded = LayerFoldedModel.from_pretrained(path).eval()
    x = build_transforms(loaded, is_training=False)(Image.new("L", (40, 30), 90)).unsqueeze(0)
    assert x.shape == (1, 1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-4, atol=1e-4)
    rgb = timm.create_model(f"local-dir:{path}", pretrained=True, in_chans=3).eval()  # (kept one channel, said 3)
    g = torch.randn(1, 1, 48, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(rgb(g.expand(1, 3, 48, 48)), loaded(g), rtol=1e-4, atol=1e-5)


def test_a_resave_with_a_new_head_does_not_compare_against_the_old_base(saved, tmp_path):
    """A reloaded save given another head reused the recorded "Before" (the base with 4 classes): its card said folding
    added 183 % parameters. Unchanged, a reloaded save keeps it."""
    kept = json.loads((save_folded(LayerFoldedModel.from_pretrained(saved), tmp_path / "same") / "config.json")
                      .read_text())["layerfold"]
    assert kept["stats_before"] == json.loads((saved / "config.json").read_text())["layerfold"]["stats_before"]
    net = LayerFoldedModel.from_pretrained(saved)
    net.reset_classifier(1000)
    info = json.loads((save_folded(net, tmp_path / "head") / "config.json").read_text())["layerfold"]
    assert "stats_before" not in info and info["stats_after"]["params"] > kept["stats_after"]["params"]
    assert "| Parameters |" in (tmp_path / "head" / "README.md").read_text()  # this net's own counts, no "before"


def test_an_rgb_save_loads_for_gray_images_as_timm_adapts_checkpoints(saved, folded):
    """``in_chans=1`` built a net claiming one channel with a three-channel first conv; timm's loader now sums the
    saved kernels over their channels, so a gray image gives what the RGB net gives on it in three equal channels."""
    gray = timm.create_model(f"local-dir:{saved}", pretrained=True, in_chans=1).eval()
    g = torch.randn(1, 1, 48, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(gray(g), _out(folded, g.expand(1, 3, 48, 48)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="does not support features_only"):
        timm.create_model(f"local-dir:{saved}", pretrained=True, features_only=True)
    # timm's train.py --drop-path passes drop_path_rate: the folded net has no stochastic depth to give it
    with pytest.raises(ValueError, match=r"no stochastic depth or DropBlock \(drop_path_rate=0.1\)"):
        timm.create_model(f"local-dir:{saved}", pretrained=True, drop_path_rate=0.1)


def test_a_save_keeps_only_what_fits_the_model(tmp_path, planned, folded):
    resnet = lf.prepare_model(timm.create_model("resnet10t", num_classes=4), lf.LayerFoldingConfig())
    lf.apply_plan(resnet, lf.FoldPlan.from_blocks(resnet, ["layer1.0"]))
    path = save_folded(resnet, tmp_path / "r", pretrained_cfg_overlay={"input_size": (3, 32, 32)})
    pcfg = json.loads((path / "config.json").read_text())["pretrained_cfg"]
    assert "test_input_size" not in pcfg and "test_crop_pct" not in pcfg  # (224 px and 0.95: the base model's)
    with pytest.raises(ValueError, match=r"pretrained_cfg_overlay\['mean'\] must give one number per input channel"):
        save_folded(folded, tmp_path / "m", pretrained_cfg_overlay={"mean": 0.5})
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "bad").mkdir()
    shutil.copy(path / "model.safetensors", tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "label_names": ["a", "b"]}))
    with pytest.raises(ValueError, match="has 2 label_names for 4 classes"):
        LayerFoldedModel.from_pretrained(tmp_path / "bad")
    (tmp_path / "sharded").mkdir()  # what transformers' save_pretrained(max_shard_size=...) leaves
    shutil.copy(path / "config.json", tmp_path / "sharded")
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds a sharded save: re-save the model in one file"):
        LayerFoldedModel.from_pretrained(tmp_path / "sharded")
    compiled = save_folded(torch.compile(folded), tmp_path / "c", **SAVE_KW)  # the wrapper's own net is saved
    assert lf.FoldPlan.load(compiled) == planned.layerfold_plan
    card = (save_folded(folded, tmp_path / "n", **SAVE_KW) / "README.md").read_text()
    assert "A **layer-folded** `mobilenetv2_050`" in card and "What was folded" in card  # fold_model's record


def test_transformers_auto_model_and_pipeline(saved, folded, x):
    from transformers import AutoModel, AutoModelForImageClassification, pipeline

    model = AutoModelForImageClassification.from_pretrained(saved).eval()
    assert model.config.id2label == dict(enumerate(LABELS))
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, _out(folded, x))
        pooled = AutoModel.from_pretrained(saved).eval()(pixel_values=x).pooler_output
        torch.testing.assert_close(pooled, folded.forward_head(folded.forward_features(x), pre_logits=True))

    image = _image()
    predictions = pipeline("image-classification", model=str(saved), top_k=4)(image)
    # the pipeline preprocesses as timm does with the saved pretrained_cfg (64 px, bicubic, crop 0.875, mean/std)
    timm_model = timm.create_model(f"local-dir:{saved}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(timm_model))
    probs = _out(folded, transform(image).unsqueeze(0)).softmax(-1)[0]
    assert {p["label"] for p in predictions} == set(LABELS)
    for p in predictions:
        assert abs(p["score"] - float(probs[LABELS.index(p["label"])])) < 1e-5


def test_a_transformers_model_re_saves_and_preprocesses_as_its_checkpoint(saved, tmp_path):
    """The wrapper's timm_model carries layerfold_net's defaults (224 px, ImageNet statistics): a re-save wrote those
    and dropped the labels and license, and build_transforms preprocessed at 224 px."""
    from transformers import AutoModelForImageClassification

    from hf_layerfold.collate import build_transforms

    wrapper = AutoModelForImageClassification.from_pretrained(saved)
    again = json.loads((save_folded(wrapper, tmp_path / "again") / "config.json").read_text())
    first = json.loads((saved / "config.json").read_text())
    assert again["pretrained_cfg"] == first["pretrained_cfg"] and again["label_names"] == LABELS
    assert again["pretrained_cfg"]["license"] == "apache-2.0"
    image = _image()
    torch.testing.assert_close(build_transforms(wrapper, is_training=False)(image),
                               build_transforms(LayerFoldedModel.from_pretrained(saved), is_training=False)(image))
    from hf_layerfold.collate import pretrained_cfg_of

    wrapper.config.id2label = {i: f"LABEL_{i}" for i in range(4)}  # transformers' placeholders are no class names
    assert "label_names" not in pretrained_cfg_of(wrapper)


# ---------------------------------------------------------------------------------------------------------
# The model card


def test_card_with_measurements(saved):
    card = ModelCard.load(saved / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "timm" and data["pipeline_tag"] == "image-classification"
    assert {"layer-folding", "image-classification", "timm"} <= set(data["tags"])
    assert data["base_model"] == MEASURED["base_model"] and data["datasets"] == ["fashion_mnist"]
    assert data["license"] == "apache-2.0"
    result = card.data.eval_results[0]
    assert (result.dataset_type, result.dataset_split, result.metric_type, result.metric_value) == (
        "fashion_mnist", "test", "accuracy", 0.9075)
    text = card.text
    assert "| `blocks.1.1` | `bn1.act`, `bn2.act` | `conv_pw` + `conv_dw` + `conv_pwl` | 3×3 | 1 | yes |" in text
    assert "| Non-linear activations | 35 | 31 | -4 (-11.4%) |" in text
    assert "Measured on Intel Xeon (2 threads), batch size 8, float32." in text and "| Speed-up | 1.21× |" in text
    assert "| Before folding | 91.25% |" in text and "the `test` split of `fashion_mnist`" in text
    assert '"lambda_reg": 0.5' in text and "Jevnisek, Roy" in text and "BMVC" in text
    assert f'timm.create_model("local-dir:{saved}", pretrained=True)' in text
    for absent in ("None", "N/A", "nan", "[More Information Needed]"):
        assert absent not in card.content


def test_card_leaves_out_what_was_not_measured(tmp_path, folded):
    path = save_folded(folded, tmp_path / "bare")
    card = ModelCard.load(path / "README.md")
    assert "model-index" not in card.data.to_dict() and "base_model" not in card.data.to_dict()
    text = card.text
    for absent in ("None", "N/A", "nan", "Before", "latency", "accuracy", "Layer Folding configuration"):
        assert absent not in text, absent
    assert "| Depth (convolutions on the longest path) | 48 |" in text  # measured on the folded net
    assert "| `blocks.3.0` | `bn1.act`, `bn2.act` |" in text  # from the plan alone
    assert not (path / "layerfold_config.json").exists()  # a bare LayerFoldedNet does not know its config
    # stats_before may be passed in by a caller that measured the base model
    before = lf.FoldStats(nonlinear_layers=35, depth=52, convs=52, params=692_804, macs=None)
    path = save_folded(folded, tmp_path / "with_before", stats_before=before, config=lf.LayerFoldingConfig(),
                       base_model="mobilenetv2_050")  # an architecture name, not a Hub id
    card = ModelCard.load(path / "README.md")
    assert "| Depth (convolutions on the longest path) | 52 | 48 | -4 (-7.7%) |" in card.text
    assert "| MACs per image |  | 89.67 M |  |" in card.text  # the "before" nobody measured stays empty
    assert "None" not in card.text and (path / "layerfold_config.json").exists()
    assert "base_model" not in card.data.to_dict() and "A **layer-folded** `mobilenetv2_050`," in card.text


def test_base_model_with_a_revision_keeps_the_repo_id_and_names_the_revision(tmp_path, folded):
    repo, revision = "timm/mobilenetv2_050.lamb_in1k", "3f0c9e1"
    for given in (f"{repo}@{revision}", f"hf-hub:{repo}@{revision}"):
        path = save_folded(folded, tmp_path / "rev", base_model=given, overwrite=True)
        card = ModelCard.load(path / "README.md")
        assert card.data.base_model == repo  # the metadata field takes a repo id
        assert (f"derived from [`{repo}`](https://huggingface.co/{repo}) at revision [`{revision}`]"
                f"(https://huggingface.co/{repo}/tree/{revision})") in card.text
        info = json.loads((path / "config.json").read_text())["layerfold"]
        assert info["base_model"] == f"{repo}@{revision}"
    resaved = save_folded(LayerFoldedModel.from_pretrained(path), tmp_path / "resaved")  # the revision is kept
    assert f"at revision [`{revision}`]" in ModelCard.load(resaved / "README.md").text
    for bad in (f"{repo}@", "org/na me@main", "a/b/c"):
        with pytest.raises(ValueError, match="base_model"):
            save_folded(folded, tmp_path / "never", base_model=bad)
    assert not (tmp_path / "never").exists()


def test_license_is_the_weights_unless_the_caller_says_otherwise(tmp_path, folded):
    """The model's pretrained cfg license by default (timm records it for its weights), the user's when given, none
    with ``license=False`` (what ``fold --no-pretrained`` passes: timm gives random weights the same cfg)."""
    from hf_layerfold.pretrained import _imagenet_pretrained_cfg

    assert folded.pretrained_cfg["license"] == "apache-2.0"

    def license_of(path):
        cfg = json.loads((path / "config.json").read_text())["pretrained_cfg"]
        return ModelCard.load(path / "README.md").data.license, cfg.get("license")

    path = save_folded(folded, tmp_path / "default")
    assert license_of(path) == ("apache-2.0", "apache-2.0")
    assert license_of(save_folded(LayerFoldedModel.from_pretrained(path), tmp_path / "again")) == (
        "apache-2.0", "apache-2.0")  # a folded save loaded back keeps what it recorded
    assert license_of(save_folded(folded, tmp_path / "mit", license="mit")) == ("mit", "mit")  # the user's word
    assert license_of(save_folded(folded, tmp_path / "none", license=False)) == (None, None)
    lite = copy.deepcopy(folded)  # weights loaded by hf_layerfold.pretrained: the cfg it sets, Apache-2.0
    lite.pretrained_cfg = {**_imagenet_pretrained_cfg(), "architecture": "layerfold_net"}
    assert license_of(save_folded(lite, tmp_path / "lite")) == ("apache-2.0", "apache-2.0")


def test_packaged_template_matches_model_cards_copy():
    from pathlib import Path

    repo_copy = Path(__file__).parents[1] / "model_cards" / "folded_model_card.md"
    assert Path(template_path()).read_text() == repo_copy.read_text()


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_push_without_repo_id_fails_before_any_work(tmp_path):
    target = tmp_path / "never"
    with pytest.raises(ValueError, match="repo_id"):
        save_folded(object(), target, push_to_hub=True)  # the model is not even looked at
    with pytest.raises(ValueError, match="'bad repo' is not a valid Hub repo id"):
        save_folded(object(), target, push_to_hub=True, repo_id="bad repo")
    assert not target.exists()


def test_refuses_a_foreign_non_empty_directory(tmp_path, folded, monkeypatch):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_folded(folded, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no temporary directory left behind
    monkeypatch.chdir(target)  # never the working directory (or one above it), overwrite or not
    for where in (target, tmp_path):
        with pytest.raises(FileExistsError, match="current directory or one above it"):
            save_folded(folded, where, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"
    monkeypatch.chdir(tmp_path.parent)
    save_folded(folded, target, overwrite=True)
    assert is_folded_save(target) and not (target / "notes.txt").exists()


def test_a_previous_save_holding_other_files_is_not_replaced_without_overwrite(tmp_path, folded):
    """Replacing a folded save used to delete whatever else its folder held (a .git, notes) without overwrite."""
    target = save_folded(folded, tmp_path / "save")
    (target / "NOTES.md").write_text("keep me")
    (target / ".git").mkdir()
    with pytest.raises(FileExistsError, match=r"also \['.git', 'NOTES.md'\], which a save does not write"):
        save_folded(folded, target)
    assert (target / "NOTES.md").read_text() == "keep me" and (target / ".git").is_dir() and is_folded_save(target)
    (target / "NOTES.md").unlink()
    (target / ".git").rmdir()
    for incidental in (".DS_Store", "._config.json", ".gitattributes"):  # an OS's or a Hub download's, not the user's
        (target / incidental).write_text("x")
    save_folded(folded, target)  # a save alone is replaced as before


def test_replaces_a_previous_save_atomically(tmp_path, folded, monkeypatch):
    target = tmp_path / "folded"
    save_folded(folded, target, label_names=LABELS)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lf.FoldPlan, "save", disk_full)  # fail after the weights and config were written
    with pytest.raises(OSError, match="No space"):
        save_folded(folded, target, label_names=LABELS[::-1])
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the previous save, untouched
    monkeypatch.undo()
    save_folded(folded, target, label_names=LABELS[::-1])
    assert json.loads((target / "config.json").read_text())["label_names"] == LABELS[::-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded"]  # no .tmp / .old directories left


def test_a_symlinked_save_directory_is_followed_and_kept(tmp_path, folded, x):
    """An output folder linked to another disk: the save used to replace the link with a folder of its own,
    leaving the linked disk empty."""
    real, link = tmp_path / "disk" / "folded", tmp_path / "folded"
    real.mkdir(parents=True)
    link.symlink_to(real, target_is_directory=True)
    for labels in (LABELS, LABELS[::-1]):  # a first save into the empty folder, then one replacing it
        assert save_folded(folded, link, label_names=labels) == link
        assert link.is_symlink() and json.loads((real / "config.json").read_text())["label_names"] == labels
    assert sorted(p.name for p in real.parent.iterdir()) == ["folded"]  # the swap's folders went beside it
    torch.testing.assert_close(_out(LayerFoldedModel.from_pretrained(link), x), _out(folded, x))
    (real / "NOTES.md").write_text("keep me")  # the checks see the linked folder's files
    with pytest.raises(FileExistsError, match=r"also \['NOTES.md'\]"):
        save_folded(folded, link)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        save_folded(folded, dangling)


def test_hub_names_are_read_as_hub_names(tmp_path, saved, monkeypatch):
    """``hf-hub:org/name`` loaded a local folder org/name when there was one; a revision holding "/" was taken for
    a local path."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(saved, tmp_path / "test-org" / "x")
    assert LayerFoldedModel.from_pretrained("test-org/x").pretrained_cfg["source"] == "local-dir"
    for name in ("hf-hub:test-org/x", "test-org/not-here@refs/pr/1"):
        with pytest.raises(Exception) as err:  # offline: the Hub is asked, not the folder
            LayerFoldedModel.from_pretrained(name)
        assert "not a directory holding a folded-model save" not in str(err.value)
        assert "offline" in str(err.value).lower() or "LocalEntryNotFound" in type(err.value).__name__


def test_save_arguments_are_checked_before_any_work(tmp_path, folded):
    with pytest.raises(ValueError, match="'folded' has no namespace: give it as org/name"):
        save_folded(folded, tmp_path / "a", push_to_hub=True, repo_id="folded")
    with pytest.raises(ValueError, match=r"key\(s\) \['crop_percentage'\].*known: \["):  # timm could not load it
        save_folded(folded, tmp_path / "a", pretrained_cfg_overlay={"crop_percentage": 1.0})
    with pytest.raises(ValueError, match=r"save_folded\(label_names=...\)"):
        save_folded(folded, tmp_path / "a", pretrained_cfg_overlay={"label_names": LABELS})
    with pytest.raises(TypeError, match="got the string 'cats'"):
        save_folded(folded, tmp_path / "a", label_names="cats")
    assert not (tmp_path / "a").exists()


def test_a_headless_model_and_a_quoted_path_save(tmp_path, x):
    """num_classes=0 failed with KeyError 'label_names'; a path holding '"' made the card's snippets invalid Python."""
    import ast

    torch.manual_seed(0)
    model = lf.prepare_with_plan(timm.create_model("mobilenetv2_035", num_classes=0), ["blocks.1.1"],
                                 lf.LayerFoldingConfig()).eval()
    path = save_folded(model, tmp_path / 'my "best" model')
    torch.testing.assert_close(_out(LayerFoldedModel.from_pretrained(path), x), _out(model, x))
    lines = [ln for ln in (path / "README.md").read_text().splitlines() if "from_pretrained(" in ln
             or "create_model(" in ln]
    assert len(lines) >= 3 and all(ast.parse(ln.strip()) for ln in lines)
    assert str(path) in ast.literal_eval(lines[-1].split("from_pretrained(")[1].rstrip(")"))
    headed = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=5).eval()  # a new head, as timm's
    assert headed(x).shape == (1, 5)                                            # own headless saves take one
    torch.testing.assert_close(headed.forward_head(headed.forward_features(x), pre_logits=True), _out(model, x))


def test_a_replaced_save_is_exchanged_in_one_step():
    """Linux: renameat2(RENAME_EXCHANGE), so a reader never finds no save between the two renames."""
    import tempfile

    from hf_layerfold import hub

    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        a.mkdir()
        b.mkdir()
        (a / "f").write_text("a")
        (b / "f").write_text("b")
        if not hub._exchange(a, b):
            pytest.skip("no renameat2 exchange on this system")
        assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"


def test_missing_or_corrupt_weights_name_the_file(tmp_path, folded):
    path = save_folded(folded, tmp_path / "folded")
    weights = path / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt weights file .*model.safetensors"):
        LayerFoldedModel.from_pretrained(path)
    with pytest.raises(RuntimeError, match=f"{path}/model.safetensors"):
        timm.create_model(f"local-dir:{path}", pretrained=True)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing weights file {weights}"):
        LayerFoldedModel.from_pretrained(path)
    with pytest.raises(RuntimeError, match=str(path)):
        timm.create_model(f"local-dir:{path}", pretrained=True)


def _edit_config(path: Path, edit) -> None:
    data = json.loads((path / "config.json").read_text())
    edit(data)
    (path / "config.json").write_text(json.dumps(data))


def test_a_newer_saves_records_load_and_a_newer_format_is_refused(tmp_path, folded, x, caplog):
    """A config field of a newer hf_layerfold in the save's record made LayerFoldedModel refuse a model timm loaded;
    format_version was written but never read, so a newer spec could load as another network without a word."""
    path = save_folded(folded, tmp_path / "folded", config=lf.LayerFoldingConfig())
    _edit_config(path, lambda d: d["model_args"]["layerfold"]["config"].update(some_future_knob=3))
    with caplog.at_level("WARNING", logger="hf_layerfold.folded_model"):
        net = LayerFoldedModel.from_pretrained(path)
    assert "layerfold.config has field(s) ['some_future_knob'] that this hf_layerfold does not know" in caplog.text
    assert net.layerfold_config == lf.LayerFoldingConfig() and torch.equal(_out(net, x), _out(folded, x))
    _edit_config(path, lambda d: d["model_args"]["layerfold"]["plan"].update(groups=[["a"]]))
    with caplog.at_level("WARNING", logger="hf_layerfold.folded_model"):
        net = LayerFoldedModel.from_pretrained(path)
    assert "layerfold.plan has field(s) ['groups']" in caplog.text and net.layerfold_plan == folded.layerfold_plan
    resaved = json.loads((save_folded(net, tmp_path / "resaved") / "config.json").read_text())["layerfold"]
    assert resaved["plan"] == folded.layerfold_plan.to_dict()  # (it was re-saved as an empty plan)
    _edit_config(path, lambda d: d["model_args"]["layerfold"].update(format_version=2, hf_layerfold_version="9.0"))
    said = r"format_version 2 \(written by hf_layerfold 9.0\); this hf_layerfold reads format_version <= 1"
    with pytest.raises(ValueError, match=said):
        LayerFoldedModel.from_pretrained(path)
    with pytest.raises(ValueError, match=said):
        timm.create_model(f"local-dir:{path}", pretrained=True)


def test_a_damaged_layer_spec_names_its_place_and_file(tmp_path, folded):
    """A spec missing a field was a bare KeyError ('groups'), and timm blamed the weights file."""
    from hf_layerfold.folded_net import FoldedSpecError

    path = save_folded(folded, tmp_path / "folded")
    data = json.loads((path / "config.json").read_text())
    index = next(i for i, spec in enumerate(data["model_args"]["features"]) if spec["type"] == "conv")
    _edit_config(path, lambda d: d["model_args"]["features"][index].pop("groups"))
    said = fr"model_args.features\[{index}\] \(type 'conv'\) lacks the field 'groups'"
    with pytest.raises(FoldedSpecError, match=f"{path}.*{said}"):
        LayerFoldedModel.from_pretrained(path)
    with pytest.raises(FoldedSpecError, match=said) as info:
        timm.create_model(f"local-dir:{path}", pretrained=True)
    assert "model.safetensors" not in str(info.value)


def test_a_bad_field_in_a_config_file_names_the_file(tmp_path):
    (tmp_path / "layerfold_config.json").write_text('{"lambda_reg": null}')
    with pytest.raises(ValueError, match=f"{tmp_path}.*lambda_reg=None is invalid"):
        lf.LayerFoldingConfig.from_pretrained(tmp_path)


def test_rejects_a_model_that_was_not_folded(tmp_path):
    plain = tmp_path / "plain"
    timm.models.save_for_hf(timm.create_model("mobilenetv2_050", num_classes=4), str(plain),
                            safe_serialization=True)
    with pytest.raises(ValueError, match="'mobilenetv2_050', not a layer-folded model"):
        LayerFoldedModel.from_pretrained(plain)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        LayerFoldedModel.from_pretrained(f"local-dir:{tmp_path / 'absent'}")


def test_bad_card_fields_fail_before_any_work(tmp_path, folded):
    with pytest.raises(ValueError, match=r"'latency' needs \['device'\]"):
        save_folded(folded, tmp_path / "a", latency={"after_ms": 1.0, "batch_size": 1, "dtype": "float32"})
    with pytest.raises(TypeError, match="unknown argument"):
        save_folded(folded, tmp_path / "b", acuracy={"after": 0.9})
    with pytest.raises(ValueError, match="fractions"):
        save_folded(folded, tmp_path / "c", accuracy={"after": 90.5, "split": "test"})
    assert list(tmp_path.iterdir()) == []


def test_a_save_does_not_describe_the_base_models_weights_as_its_own(tmp_path, folded):
    """A base cfg's description / origin_url / paper ids told where the *base* weights came from."""
    folded.pretrained_cfg = {**folded.pretrained_cfg, "description": "ImageNet weights of the base",
                             "origin_url": "https://example.org/base", "paper_ids": "arXiv:0000.00000"}
    saved = json.loads((save_folded(folded, tmp_path / "a", **SAVE_KW) / "config.json").read_text())
    assert not {"description", "origin_url", "paper_ids"} & set(saved["pretrained_cfg"])


def test_stats_before_counted_at_another_size_are_refused(tmp_path, planned, folded):
    """The README's ``fold_stats(model)`` counts at 224 px; passed as ``stats_before`` to a 64 px save, the card
    compared 224 px MACs with 64 px ones (-92 % instead of -8 %)."""
    overlay = {"input_size": (3, 64, 64)}
    with pytest.raises(ValueError, match=r"stats_before counted MACs at \(3, 224, 224\).*\(3, 64, 64\)"):
        save_folded(folded, tmp_path / "s", stats_before=lf.fold_stats(planned), pretrained_cfg_overlay=overlay)
    assert not (tmp_path / "s").exists()
    path = save_folded(folded, tmp_path / "s", stats_before=lf.fold_stats(planned, (3, 64, 64)),
                       pretrained_cfg_overlay=overlay)
    assert json.loads((path / "config.json").read_text())["layerfold"]["stats_before"] == \
        lf.fold_stats(planned, (3, 64, 64)).to_dict()  # (the size is not part of the record)


def test_a_save_folder_that_cannot_be_renamed_is_replaced_file_by_file(tmp_path, folded, x, monkeypatch):
    """A volume mounted at the save folder (renaming it fails with EBUSY) or a folder whose parent is not the
    user's: the save failed, or left a hidden copy of the old one. Its files are now replaced in place."""
    from hf_layerfold import hub

    target = tmp_path / "volume"
    (target / "lost+found").mkdir(parents=True)  # (the root of a fresh ext4 volume)
    monkeypatch.setattr(hub.os.path, "ismount", lambda p: Path(p) == target)
    held = os.open(target, os.O_RDONLY)  # (keeps the folder's inode from being reused by a swapped-in one)
    for labels in (LABELS, LABELS[::-1]):  # into the empty folder, then over its save
        assert save_folded(folded, target, label_names=labels) == target
        assert json.loads((target / "config.json").read_text())["label_names"] == labels
    assert os.path.samestat(os.fstat(held), target.stat()) and sorted(p.name for p in tmp_path.iterdir()) == ["volume"]
    assert {p.name for p in target.iterdir()} == set(hub.SAVE_FILES) - {"layerfold_config.json"} | {"lost+found"}
    (target / ".layerfold-tmp-0123abcd").mkdir()  # what a save killed midway leaves: no reason to refuse the next
    save_folded(folded, target)
    assert {p.name for p in target.iterdir()} == set(hub.SAVE_FILES) - {"layerfold_config.json"} | {"lost+found"}
    os.close(held)
    torch.testing.assert_close(_out(LayerFoldedModel.from_pretrained(target), x), _out(folded, x))
    (target / "NOTES.md").write_text("x")
    with pytest.raises(FileExistsError, match=r"also \['NOTES.md'\]"):
        save_folded(folded, target)
    save_folded(folded, target, overwrite=True)  # the whole folder's contents replaced, as a swap would
    assert not (target / "NOTES.md").exists() and is_folded_save(target) and (target / "lost+found").is_dir()
    real_access = os.access
    monkeypatch.setattr(hub.os, "access", lambda p, mode: mode != os.W_OK and real_access(p, mode))
    with pytest.raises(PermissionError, match="is read-only; make it writable"):  # (root writes anyway: simulated)
        save_folded(folded, target)


def test_a_model_without_values_or_a_file_in_the_path_is_refused_before_the_fold(tmp_path, folded):
    """A meta-device model failed in the weights copy ('Cannot copy out of meta tensor'); a file where a folder of
    the path should be failed in mkdir with a bare FileExistsError."""
    with torch.device("meta"):
        empty = copy.deepcopy(folded).to("meta")
    with pytest.raises(ValueError, match="on the meta device"):
        save_folded(empty, tmp_path / "meta")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"file.bin is a file, not a directory"):
        save_folded(folded, tmp_path / "file.bin" / "sub")
    assert not (tmp_path / "meta").exists() and (tmp_path / "file.bin").read_text() == "x"


def test_a_hand_edited_or_hostile_save_is_refused_naming_the_field_before_anything_large_is_built(tmp_path, folded):
    """A conv edited to a 400×400 kernel made both loaders allocate 2.6 GB before 'size mismatch' (10000×10000:
    77 GB); stride 0, a string bias or an unknown pool loaded and failed at the first forward (or read "false" as
    true); num_classes -1 gave timm's load a random 1000-class head; NaN weights loaded and output NaN."""
    from hf_layerfold.folded_net import FoldedSpecError

    good = save_folded(folded, tmp_path / "good")
    index = next(i for i, s in enumerate(json.loads((good / "config.json").read_text())["model_args"]["features"])
                 if s["type"] == "conv" and i > 0)

    def edited(name, edit):
        path = tmp_path / name
        shutil.copytree(good, path)
        _edit_config(path, edit)
        return path

    def conv(**fields):
        return lambda d: d["model_args"]["features"][index].update(fields)

    huge = edited("huge", conv(kernel=[20000, 20000]))
    for load in (LayerFoldedModel.from_pretrained, lambda p: timm.create_model(f"local-dir:{p}", pretrained=True)):
        with pytest.raises(FoldedSpecError, match="describe convs with .* parameters .* a corrupt or hostile spec"):
            load(huge)
    big = edited("big", conv(kernel=[400, 400]))  # within the cap: its shapes are compared before it is built
    with pytest.raises(ValueError, match=rf"does not fit the folded structure .*features.{index}.weight"):
        LayerFoldedModel.from_pretrained(big)
    with pytest.raises(FoldedSpecError, match=rf"config.json model_args do not match .*features.{index}.weight"):
        timm.create_model(f"local-dir:{big}", pretrained=True)
    for name, edit, said in (
            ("stride", conv(stride=[0, 0]), r"field 'stride' must be two whole numbers >= 1, got \[0, 0\]"),
            ("bias", conv(bias="false"), "field 'bias' must be true or false, got 'false'"),
            ("pool", lambda d: d["model_args"].update(global_pool="median"), "'median' is not a timm pool type"),
            ("size", lambda d: d["pretrained_cfg"].update(input_size="3,32,32"),
             r"pretrained_cfg.input_size must be \[channels, height, width\]")):
        path = edited(name, edit)
        with pytest.raises(FoldedSpecError, match=said):
            LayerFoldedModel.from_pretrained(path)
        with pytest.raises(FoldedSpecError, match=said):
            timm.create_model(f"local-dir:{path}", pretrained=True)
    headless = edited("classes", lambda d: (d.update(num_classes=-1), d["pretrained_cfg"].update(num_classes=-1)))
    with pytest.raises(FoldedSpecError, match="no valid num_classes"):
        timm.create_model(f"local-dir:{headless}", pretrained=True)
    nan = edited("nan", lambda d: None)
    state = safetensors.torch.load_file(nan / "model.safetensors")
    state[f"features.{index}.weight"][0, 0, 0, 0] = float("nan")
    safetensors.torch.save_file(state, nan / "model.safetensors")
    with pytest.raises(ValueError, match=rf"NaN or infinite values in \['features.{index}.weight'\]"):
        LayerFoldedModel.from_pretrained(nan)
    with pytest.raises(Exception, match=rf"NaN or infinite values in \['features.{index}.weight'\]"):
        timm.create_model(f"local-dir:{nan}", pretrained=True)  # (any load_state_dict of a folded net)
