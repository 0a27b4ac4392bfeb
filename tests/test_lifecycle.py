"""The model objects' lifecycle: copies, pickles, state dicts, tracing, wrappers and timm's interface."""

import copy
import io
import pickle
import warnings

import pytest
import timm
import torch
import torch.nn as nn
from conftest import randomize_bn, rel_err

import hf_layerfold as lf
from hf_layerfold.folded_net import UnknownLayerTypeError
from hf_layerfold.graph import ActNode, ConvNode, ModelGraph, register_model_rule
from hf_layerfold.layers import PaddedConv2d
from hf_layerfold.padding import PadRule

pytestmark = pytest.mark.usefixtures("one_thread")


def small(name="mobilenetv2_050"):
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, num_classes=10)).eval()


def _torch_save_load(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), _torch_save_load],
                         ids=["deepcopy", "pickle", "torch.save"])
def test_block_shared_alpha_survives_copies_and_state_dicts(clone):
    model = lf.prepare_model(small(), lf.LayerFoldingConfig(alpha_sharing="block", blend="eager"))
    alphas = lf.unique_alphas(lf.alpha_parameters(model).values())
    with torch.no_grad():
        for i, a in enumerate(alphas):
            a.fill_(0.1 * (i % 7))
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    copied = clone(model)
    shared = lf.unique_alphas(lf.alpha_parameters(copied).values())
    assert len(shared) == len(alphas) < len(lf.alpha_parameters(copied))  # still shared, and inside the copy
    assert {id(a) for a in shared} <= {id(p) for p in copied.parameters()}
    assert torch.equal(copied(x), ref)
    with torch.no_grad():
        shared[1].add_(0.5)  # the copy's α moves; the original does not
    assert torch.equal(model(x), ref) and not torch.equal(copied(x), ref)
    fresh = lf.prepare_model(small(), lf.LayerFoldingConfig(alpha_sharing="block", blend="eager"))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh(x), ref)


class _SharedActNet(nn.Module):
    """One ``nn.ReLU(inplace=True)`` instance called at two places."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.global_pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)
        self.num_classes, self.num_features = 4, 8

    def forward(self, x):
        x = self.act(self.b1(self.c1(x)))
        x = self.act(self.b2(self.c2(x)))
        return self.fc(self.global_pool(self.c3(x)).flatten(1))


@register_model_rule(_SharedActNet)
def _shared_act_rule(model):
    return ModelGraph([ConvNode("c1", "b1"), ActNode("act"), ConvNode("c2", "b2"), ActNode("act"), ConvNode("c3")],
                      "global_pool", "fc")


def test_activation_instance_called_twice_is_one_site_wrapped_once():
    torch.manual_seed(0)
    model = randomize_bn(_SharedActNet()).eval()
    x = torch.randn(2, 3, 12, 12)
    ref = model(x)
    assert lf.foldable_sites(model) == ["act"]
    lf.prepare_model(model, lf.LayerFoldingConfig(blend="eager"))
    assert type(model.act.act) is nn.ReLU  # not a FoldableActivation inside a FoldableActivation
    assert list(lf.alpha_parameters(model)) == ["act"] and "act.act.alpha" not in model.state_dict()
    assert torch.allclose(model(x), ref, atol=1e-6)
    with torch.no_grad():
        model.act.alpha.fill_(0.5)  # one α, applied once at each call site
    h = model.b1(model.c1(x))
    h = 0.5 * torch.relu(h) + 0.5 * h
    h = model.b2(model.c2(h))
    h = 0.5 * torch.relu(h) + 0.5 * h
    assert torch.allclose(model(x), model.fc(model.global_pool(model.c3(h)).flatten(1)), atol=1e-6)
    lf.apply_plan(model, lf.FoldPlan(["act"]))
    folded = lf.fold_model(model)
    assert len(folded.features) == 1 and torch.allclose(folded(x), model(x), atol=1e-5)


@pytest.mark.parametrize("trace", ["jit.trace", "export"])
def test_traced_input_size_dependent_padding_follows_the_input_size(trace):
    """A planned / folded conv with TF-'same' padding (tf_efficientnet_*) that is traced at one size pads right at
    another, as timm's own Conv2dSame does (it used to bake the traced size's padding in)."""
    torch.manual_seed(0)
    rules = [PadRule((3, 3), (2, 2), None), PadRule((3, 3), (1, 1), (1, 1, 1, 1)), PadRule((5, 5), (2, 2), None)]
    conv = PaddedConv2d(4, 6, (11, 11), stride=(4, 4), pad_rules=rules).double()
    x, other = torch.randn(1, 4, 32, 32, dtype=torch.double), torch.randn(1, 4, 29, 27, dtype=torch.double)
    if trace == "jit.trace":
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)  # no size read as a Python number
            warnings.simplefilter("ignore", FutureWarning)  # (torch.jit.trace is deprecated)
            traced = torch.jit.trace(conv, x)
    else:
        h, w = torch.export.Dim("h", min=16, max=64), torch.export.Dim("w", min=16, max=64)
        traced = torch.export.export(conv, (x,), dynamic_shapes={"x": {2: h, 3: w}}).module()
    for inp in (x, other):
        assert traced(inp).shape == conv(inp).shape
        assert torch.allclose(traced(inp), conv(inp), rtol=0, atol=1e-12)


def test_folded_net_grad_checkpointing_like_timm():
    model = lf.prepare_model(small(), lf.LayerFoldingConfig(blend="eager"))
    lf.apply_plan(model, lf.FoldPlan(lf.foldable_sites(model)[::2]))
    folded = lf.fold_model(model).train()
    x = torch.randn(2, 3, 32, 32)
    ref = folded(x)
    ref.square().sum().backward()
    grads = [p.grad.clone() for p in folded.parameters()]
    folded.zero_grad()
    folded.set_grad_checkpointing(True)  # what timm's train.py and transformers' TimmWrapper call
    out = folded(x)
    out.square().sum().backward()
    assert torch.allclose(out, ref) and all(torch.allclose(p.grad, g) for p, g in zip(folded.parameters(), grads))
    folded.set_grad_checkpointing(False)
    assert not folded.grad_checkpointing


@pytest.mark.parametrize("wrap", [nn.DataParallel, "timm_model"], ids=["DataParallel", "TimmWrapper"])
def test_wrapped_models_name_the_model_to_pass(wrap):
    model = small()
    if wrap == "timm_model":  # transformers' TimmWrapperForImageClassification keeps the timm model here
        wrapped = nn.Module()
        wrapped.timm_model = model
    else:
        wrapped = wrap(model)
    attr = "timm_model" if wrap == "timm_model" else "module"
    with pytest.raises(lf.UnsupportedModelError, match=rf"wrapper.*EfficientNet it wraps \(model\.{attr}\)"):
        lf.prepare_model(wrapped)
    with pytest.raises(lf.UnsupportedModelError, match=rf"model\.{attr}"):
        lf.fold_model(wrapped)


class _MaxPoolNet(_SharedActNet):
    """A custom family pooling by maximum, with no ``num_features`` (the README's rule example needs none)."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.global_pool = pool
        del self.num_features


@register_model_rule(_MaxPoolNet)
def _max_pool_rule(model):
    return _shared_act_rule(model)


def test_a_custom_pool_is_rebuilt_or_refused_not_averaged(tmp_path):
    """``nn.AdaptiveMaxPool2d`` was folded into average pooling (0.35 off, no warning)."""
    torch.manual_seed(0)
    model = randomize_bn(_MaxPoolNet(nn.AdaptiveMaxPool2d(1))).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.double)
    lf.prepare_model(model, lf.LayerFoldingConfig(blend="eager"))
    lf.apply_plan(model, lf.FoldPlan(["act"]))
    folded = lf.fold_model(model)
    assert folded.global_pool.pool_type == "max"
    assert rel_err(folded(x), model(x)) < 1e-12
    with pytest.raises(ValueError, match="no pretrained_cfg to record its preprocessing from"):
        lf.save_folded(model, tmp_path / "no-cfg")  # (timm's AssertionError from its data config)
    saved = lf.save_folded(model, tmp_path / "cfg", pretrained_cfg_overlay={"input_size": (3, 12, 12)})
    assert rel_err(lf.LayerFoldedModel.from_pretrained(saved)(x), model(x)) < 1e-12
    with pytest.raises(lf.UnsupportedModelError, match="pooling AdaptiveAvgPool2d cannot be rebuilt"):
        lf.prepare_model(_MaxPoolNet(nn.AdaptiveAvgPool2d(2)))  # refused before training, not at the fold


def test_what_cannot_fold_is_refused_before_training():
    from functools import partial

    from timm.layers import BatchNormAct2d

    no_stats = timm.create_model("mobilenetv2_035", num_classes=4,
                                 norm_layer=partial(BatchNormAct2d, track_running_stats=False))
    with pytest.raises(lf.UnsupportedModelError, match=r"bn1 keeps no running statistics"):
        lf.prepare_model(no_stats)
    with pytest.raises(lf.UnsupportedModelError, match=r"bn1 keeps no running statistics"):
        lf.fold_model(no_stats)  # plain BatchNorm fusion: the same check
    reflect = timm.create_model("resnet10t", num_classes=4)
    reflect.conv1[0].padding_mode = "reflect"
    with pytest.raises(lf.UnsupportedModelError, match=r"conv1.0 has padding_mode='reflect'"):
        lf.prepare_model(reflect)


def test_a_model_in_float64_trains_and_evaluates_on_float32_batches(tmp_path):
    """The collators make float32 images: a ``.bfloat16()`` / float64 model (or a save reloaded in its dtype)
    failed at its first conv."""
    from transformers import TrainingArguments

    from hf_layerfold.collate import as_input_of
    from hf_layerfold.fashion_mnist import load_fashion_mnist
    from hf_layerfold.workflow import evaluate_model

    data = load_fashion_mnist(train_size=8, test_size=8, seed=0)
    model = timm.create_model("mobilenetv2_035", num_classes=10).double()
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = lf.LayerFoldingTrainer(model, args, train_dataset=data["train"], eval_dataset=data["test"],
                                     input_size=32)
    trainer.train()
    assert "eval_top1" in trainer.evaluate()
    assert 0 <= evaluate_model(model, data["test"], image_size=32, batch_size=8, progress=False)["top1"] <= 1
    assert as_input_of(model, torch.zeros(1, 3).long()).dtype == torch.long  # not images: untouched


class _GrayNet(_SharedActNet):
    """One input channel and no ``in_chans`` attribute."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)


@register_model_rule(_GrayNet)
def _gray_rule(model):
    return _shared_act_rule(model)


def test_a_custom_model_folds_with_the_channels_its_first_conv_takes():
    torch.manual_seed(0)
    model = randomize_bn(_GrayNet()).double().eval()
    x = torch.randn(2, 1, 12, 12, dtype=torch.double)
    folded = lf.fold_model(model)
    assert folded.in_chans == 1 and rel_err(folded(x), model(x)) < 1e-12


def test_a_rule_naming_the_wrong_module_is_refused_by_name():
    class Wrong(_SharedActNet):
        pass

    @register_model_rule(Wrong)
    def _wrong(model):
        return ModelGraph([ConvNode("b1", "c1"), ActNode("act"), ConvNode("c2", "b2")], "global_pool", "fc")

    with pytest.raises(lf.UnsupportedModelError, match="b1 is a BatchNorm2d, where the model's graph expects a Conv2d"):
        lf.prepare_model(Wrong())


def _folded_tf_same():
    model = lf.prepare_model(small("tf_efficientnet_lite0"))
    return lf.fold_model(lf.apply_plan(model, lf.FoldPlan.from_blocks(model, ["blocks.1.0", "blocks.2.1"])))


def test_fx_feature_extraction_and_quantization_trace_a_folded_tf_same_net():
    """Symbolic tracing failed on the input-size-dependent padding (a Python max of a traced size); timm keeps its
    own Conv2dSame out of FX the same way, as one recorded call."""
    from timm.models._features_fx import create_feature_extractor
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    folded = _folded_tf_same()
    extractor = create_feature_extractor(folded, {"features": "last", "classifier": "logits"})
    for size in ((64, 64), (33, 47)):  # the padding follows each input's size
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            out = extractor(x)
            assert torch.equal(out["last"], folded.forward_features(x)) and torch.equal(out["logits"], folded(x))
    x = torch.randn(2, 3, 48, 48)
    prepared = prepare_fx(copy.deepcopy(folded), get_default_qconfig_mapping("x86"), example_inputs=(x,))
    with torch.no_grad():
        prepared(x)
        quantized = convert_fx(prepared)
        assert rel_err(quantized(x), folded(x)) < 0.5  # int8: near, not equal
    with pytest.raises(TypeError, match="save_folded got a torch.fx GraphModule"):
        lf.save_folded(quantized, "unused")
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(folded), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match="save the folded net before quantizing it"):
        lf.save_folded(dynamic, "unused")


def test_a_folded_nets_pretrained_cfg_names_its_own_layers_and_no_base_weights():
    model = lf.prepare_model(small("resnet18"))
    assert model.pretrained_cfg["num_classes"] == 1000 and model.pretrained_cfg.get("hf_hub_id")
    folded = lf.fold_model(lf.apply_plan(model, lf.FoldPlan()))
    cfg = folded.pretrained_cfg
    assert folded.default_cfg is cfg and cfg["architecture"] == "layerfold_net"
    assert (cfg["num_classes"], cfg["first_conv"], cfg["classifier"]) == (10, "features.0", "classifier")
    assert dict(folded.named_modules())["features.0"] is not None and "hf_hub_id" not in cfg and "url" not in cfg
    assert timm.data.resolve_model_data_config(folded) == timm.data.resolve_model_data_config(model)


def test_a_head_pool_the_head_convs_cannot_take_is_refused_and_changes_nothing():
    folded = lf.fold_model(lf.apply_plan(lf.prepare_model(small("mobilenetv3_small_050")), lf.FoldPlan()))
    args = copy.deepcopy(folded.model_args)
    with pytest.raises(ValueError, match=r"global_pool='catavgmax' pools 288 features to 576 \(2x\), but this "
                                         r"folded net's head conv \(pre_logits\) takes 288"):
        folded.reset_classifier(0, "catavgmax")
    assert folded.model_args == args and folded.num_classes == 10
    assert folded(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_fold_model_of_an_unprepared_model_refuses_what_prepare_refuses_with_the_same_error():
    """A blur-pool ResNet raised UnsupportedModelError from prepare_model but a bare ValueError from fold_model."""
    model = timm.create_model("resnetblur18", num_classes=10)
    for call in (lf.prepare_model, lf.fold_model):
        with pytest.raises(lf.UnsupportedModelError, match="maxpool"):
            call(model)


class _HeadConvNet(nn.Module):
    """A family of one's own with a head conv after the pooling (as MobileNetV3) and no ``num_features``."""

    def __init__(self, pool: str = "avg"):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU()
        self.pool = timm.layers.SelectAdaptivePool2d(pool_type=pool)
        width = 32 * self.pool.feat_mult()
        self.conv_head, self.act3, self.fc, self.num_classes = nn.Conv2d(width, 64, 1), nn.ReLU(), nn.Linear(64, 10), 10

    def forward(self, x):
        x = self.act2(self.bn2(self.conv2(self.act(self.bn(self.conv(x))))))
        return self.fc(self.act3(self.conv_head(self.pool(x))).flatten(1))


@register_model_rule(_HeadConvNet)
def _head_conv_net(model):
    return ModelGraph([ConvNode("conv", "bn"), ActNode("act"), ConvNode("conv2", "bn2"), ActNode("act2")],
                      pool="pool", classifier="fc", pre_logits=[ConvNode("conv_head", None), ActNode("act3")])


def test_a_family_with_a_head_conv_and_no_num_features_folds():
    """The pooled width was taken from the classifier's input (the head conv's output) and the new head-width check
    refused the net fold_model built."""
    for pool in ("avg", "catavgmax"):
        model = randomize_bn(_HeadConvNet(pool)).double().eval()
        folded = lf.fold_model(model)
        x = torch.randn(2, 3, 17, 19, dtype=torch.float64)
        with torch.no_grad():
            assert rel_err(model(x), folded(x)) < 1e-12
        assert (folded.num_features, folded.head_hidden_size) == (32, 64)


def test_a_mobilenetv3_built_with_a_widening_pool_folds_exactly():
    """timm sizes conv_head for catavgmax's doubled width; fold_model refused it, after the whole training."""
    model = randomize_bn(timm.create_model("mobilenetv3_small_050", num_classes=10, global_pool="catavgmax"))
    model = lf.prepare_with_plan(model.double().eval(), ["blocks.1.0"])
    folded = lf.fold_model(model)
    x = torch.randn(2, 3, 37, 45, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(model(x), folded(x)) < 1e-10
    with pytest.raises(ValueError, match=r"global_pool='avg' pools .* \(1x\), but this folded net's head conv"):
        folded.reset_classifier(5, "avg")  # as timm's own reset_classifier refuses a change of width


def test_custom_rule_mistakes_are_named_before_training():
    class Typo(_SharedActNet):
        pass

    class DropoutHead(_SharedActNet):
        def __init__(self):
            super().__init__()
            self.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 4))

    @register_model_rule(Typo)
    def _typo(model):
        return ModelGraph([ConvNode("c1", "b1"), ActNode("acts"), ConvNode("c2", "b2")], "global_pool", "fc")

    @register_model_rule(DropoutHead)
    def _dropout_head(model):
        return _shared_act_rule(model)

    with pytest.raises(lf.UnsupportedModelError, match="rule of Typo names ActNode 'acts', which is not a submodule"):
        lf.prepare_model(Typo())
    with pytest.raises(lf.UnsupportedModelError, match="names classifier 'fc', a Sequential; .* one nn.Linear"):
        lf.prepare_model(DropoutHead())  # it failed in fold_model, after training
    with pytest.raises(lf.UnsupportedModelError, match=r"torch.nn.modules.container.Sequential is not supported .*"
                                                      r"register_model_rule"):
        lf.prepare_model(nn.Sequential(nn.Conv2d(3, 3, 1)))


class _ActFirstNet(_SharedActNet):
    """An activation module registered before the first conv: the first parameter is then a site's α (float32)."""

    def __init__(self):
        super().__init__()
        del self.c1, self.b1  # (registered again after the activation)
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)


@register_model_rule(_ActFirstNet)
def _act_first_rule(model):
    return _shared_act_rule(model)


def test_a_float64_model_folds_in_float64_whatever_its_first_parameter():
    torch.manual_seed(0)
    model = lf.prepare_model(randomize_bn(_ActFirstNet()).double().eval())
    assert next(model.parameters()).dtype == torch.float32  # α
    folded = lf.fold_model(lf.apply_plan(model, lf.FoldPlan(("act",))))
    x = torch.randn(2, 3, 9, 11, dtype=torch.double)
    assert next(folded.parameters()).dtype == torch.float64 and rel_err(folded(x), model(x)) < 1e-12


class _Gate(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.scale)


def test_register_op_refuses_what_would_break_other_saves_and_a_save_says_it_needs_the_op(tmp_path):
    from hf_layerfold.folded_net import OP_BUILDERS, OP_KINDS, OP_SPECS, build_layer

    with pytest.raises(ValueError, match="kind 'conv' is a built-in layer type"):
        lf.register_op(_Gate, "conv", lambda m: {}, lambda s: _Gate())
    with pytest.raises(ValueError, match="kind 'se' is already registered for SqueezeExcite"):
        lf.register_op(_Gate, "se", lambda m: {}, lambda s: _Gate())
    lf.register_op(_Gate, "test_gate", lambda m: {"type": m.scale.numel()}, lambda s: _Gate())
    try:
        with pytest.raises(ValueError, match="to_spec returned a 'type' field"):
            lf.folded_net.op_spec(_Gate())
        lf.register_op(_Gate, "test_gate", lambda m: {"channels": m.scale.numel()}, lambda s: _Gate(s["channels"]))
        from hf_layerfold.folded_net import registered_kinds
        from hf_layerfold.model_card import render_card  # noqa: F401  (the card names the op)

        assert registered_kinds([{"type": "residual", "branch": [{"type": "test_gate"}], "shortcut": None}]) == \
            ["test_gate"]
    finally:
        OP_SPECS.pop(_Gate, None), OP_KINDS.pop(_Gate, None), OP_BUILDERS.pop("test_gate", None)
    with pytest.raises(UnknownLayerTypeError, match=r"register_op\(<its class>, 'test_gate'.*run that same"):
        build_layer({"type": "test_gate", "channels": 8})
