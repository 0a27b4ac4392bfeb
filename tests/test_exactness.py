"""Folded == planned, image borders included: every block type under every α pattern, and real timm models."""

import copy
import itertools
import random

import pytest
import timm
import torch
from conftest import randomize_bn, rel_err
from timm.models import efficientnet, resnet
from timm.models._efficientnet_builder import decode_arch_def

import hf_layerfold as lf
from hf_layerfold.graph import build_graph, iter_nodes

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
SIZES = (32, 29)  # even and odd: TF-'same' padding differs between them


def tiny_efficientnet(arch: list[list[str]], pad_type: str = "", act: str = "relu6") -> torch.nn.Module:
    return efficientnet.EfficientNet(decode_arch_def(arch), num_classes=7, stem_size=8, pad_type=pad_type,
                                     act_layer=timm.layers.get_act_layer(act), num_features=32)


def tiny_resnet(block: type, **kwargs) -> torch.nn.Module:
    return resnet.ResNet(block, [1, 2, 1, 1], num_classes=5, channels=(8, 16, 16, 32), stem_width=8, **kwargs)


BLOCK_MODELS = {
    "ds_ir_er_cn": lambda: tiny_efficientnet([["ds_r1_k3_s1_c8"], ["ir_r1_k3_s2_e3_c16", "ir_r1_k5_s1_e4_c16"],
                                             ["er_r1_k3_s1_e4_c16"], ["er_r1_k3_s2_e2_c24"],
                                             ["cn_r1_k3_s1_c24_skip"], ["cn_r1_k1_s1_c24"]]),
    "se_blocks": lambda: tiny_efficientnet([["ds_r1_k3_s1_c8_se0.25"], ["ir_r1_k3_s2_e3_c16_se0.25"],
                                           ["ir_r1_k3_s1_e3_c16_se0.25"], ["er_r1_k3_s1_e4_c16_se0.25"]], act="silu"),
    "tf_same": lambda: tiny_efficientnet([["ds_r1_k3_s2_c8"], ["ir_r1_k3_s2_e3_c16", "ir_r1_k5_s1_e4_c16"],
                                         ["er_r1_k3_s2_e2_c24"], ["ir_r1_k5_s2_e6_c24"]], pad_type="same"),
    "dilated": lambda: tiny_efficientnet([["ds_r1_k3_s1_c8"], ["ir_r1_k3_s1_e3_c8_d2"]], act="hard_swish"),
    "basic": lambda: tiny_resnet(resnet.BasicBlock),
    "bottleneck": lambda: tiny_resnet(resnet.Bottleneck, act_layer=timm.layers.get_act_layer("gelu")),
}


def _block_of(site: str) -> str:
    parts = site.split(".")
    return ".".join(parts[:3]) if parts[0] == "blocks" else ".".join(parts[:2]) if "." in site else site


def _check(model: torch.nn.Module, plan: lf.FoldPlan, dtype: torch.dtype, sizes=SIZES) -> None:
    planned = lf.apply_plan(model, plan)
    folded = lf.fold_model(planned)
    for size in sizes:
        x = torch.randn(2, 3, size, size, dtype=dtype)
        with torch.no_grad():
            ref, out = planned(x), folded(x)
        assert out.shape == ref.shape
        assert rel_err(ref, out) <= TOL[dtype], (plan.linear_sites, size)


def _prepared(factory, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(factory()).to(dtype).eval()
    return lf.prepare_model(model)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(BLOCK_MODELS))
def test_every_alpha_pattern_of_every_block(name, dtype):
    base = _prepared(BLOCK_MODELS[name], dtype)
    by_block: dict[str, list[str]] = {}
    for site in lf.foldable_sites(base):
        by_block.setdefault(_block_of(site), []).append(site)
    assert by_block, "the test model must have foldable sites"
    patterns = [()]
    for sites in by_block.values():
        patterns += [c for r in range(1, len(sites) + 1) for c in itertools.combinations(sites, r)]
    patterns.append(tuple(lf.foldable_sites(base)))  # everything at once (cross-block runs)
    for pattern in patterns:
        model = _prepared(BLOCK_MODELS[name], dtype)
        _check(model, lf.FoldPlan(pattern), dtype)


def test_block_types_are_all_covered():
    seen = set()
    for factory in BLOCK_MODELS.values():
        model = factory()
        for _, module in model.named_modules():
            seen.add(type(module).__name__)
    for block in ("DepthwiseSeparableConv", "InvertedResidual", "EdgeResidual", "ConvBnAct", "BasicBlock",
                  "Bottleneck", "Conv2dSame", "SqueezeExcite"):
        assert block in seen


def test_whole_branch_linear_becomes_one_conv():
    model = _prepared(BLOCK_MODELS["basic"], torch.float64)
    plan = lf.FoldPlan(tuple(lf.foldable_sites(model)))
    folded = lf.fold_model(lf.apply_plan(model, plan))
    # every BasicBlock (identity or projection shortcut) is absorbed: no Residual module is left
    assert not any(isinstance(m, lf.layers.Residual) for m in folded.modules())
    assert lf.fold_stats(folded, None).depth == 1 + 5  # stem + one conv per block


def test_max_kernel_size_splits_runs():
    factory = BLOCK_MODELS["ds_ir_er_cn"]
    model = _prepared(factory, torch.float64)
    model.layerfold_config.max_kernel_size = 5
    plan = lf.FoldPlan(tuple(lf.foldable_sites(model)))
    planned = lf.apply_plan(model, plan)
    folded = lf.fold_model(planned)
    kernels = [m.kernel_size[0] for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert max(kernels) <= 5
    x = torch.randn(1, 3, 31, 31, dtype=torch.float64)
    assert rel_err(planned(x), folded(x)) < 1e-10


def test_empty_plan_folds_to_bn_fused_original():
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobilenetv2_050", num_classes=10)).double().eval()
    folded = lf.fold_model(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    fconvs = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.weight.shape, c.stride, c.groups) for c in convs] == [(c.weight.shape, c.stride, c.groups)
                                                                     for c in fconvs]
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    assert rel_err(model(x), folded(x)) < 1e-12
    prepared = lf.prepare_model(model)
    assert rel_err(model(x), lf.fold_model(prepared, lf.FoldPlan())(x)) < 1e-12


MODELS = ["mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0", "tf_efficientnet_lite0", "resnet18",
          "resnet50"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", MODELS)
def test_timm_models_under_random_plans(name, dtype):
    torch.manual_seed(0)
    model = lf.prepare_model(randomize_bn(timm.create_model(name, num_classes=10)).to(dtype).eval())
    rng = random.Random(name)
    sites = lf.foldable_sites(model)
    plan = lf.FoldPlan(tuple(s for s in sites if rng.random() < 0.5))
    assert 0 < len(plan) < len(sites)
    _check(model, plan, dtype, sizes=(32, 23))


@pytest.mark.parametrize("name,kwargs", [("seresnet18", {}), ("ecaresnet26t", {}),
                                         ("resnet18", {"drop_block_rate": 0.2})])
def test_se_eca_and_drop_block_resnets_fold_exactly(name, kwargs):
    """timm.layers SEModule / EcaModule are kept by folded nets; DropBlock2d (identity in eval) is not in the graph."""
    import json

    torch.manual_seed(0)
    model = lf.prepare_model(randomize_bn(timm.create_model(name, num_classes=5, **kwargs)).double().eval())
    sites = lf.foldable_sites(model)
    rng = random.Random(name)
    _check(model, lf.FoldPlan(tuple(s for s in sites if rng.random() < 0.5)), torch.float64, sizes=(32, 23))
    folded = lf.fold_model(model)
    rebuilt = lf.LayerFoldedNet(**json.loads(json.dumps(folded.model_args))).double().eval()
    rebuilt.load_state_dict(folded.state_dict())
    x = torch.randn(1, 3, 29, 35, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), folded(x))


@pytest.mark.parametrize("output_stride", [16, 8])
def test_deep_stem_resnet_at_a_smaller_output_stride_keeps_its_same_padded_shortcut_pools(output_stride):
    """resnet*d shortcuts average-pool with timm's TF-"same" pool once their stride becomes a dilation; it was kept
    as a plain average pool (a subclass), so the folded net failed at every input size. A subclass of a keepable op
    with a forward of its own is now refused instead of kept as its parent."""
    import json

    torch.manual_seed(0)
    model = tiny_resnet(resnet.BasicBlock, stem_type="deep", avg_down=True, output_stride=output_stride)
    model = lf.prepare_model(randomize_bn(model).double().eval())
    assert any(type(m).__name__ == "AvgPool2dSame" for m in model.modules())
    rng = random.Random(output_stride)
    sites = lf.foldable_sites(model)
    for plan in (lf.FoldPlan(tuple(sites)), lf.FoldPlan(tuple(s for s in sites if rng.random() < 0.5))):
        _check(copy.deepcopy(model), plan, torch.float64, sizes=(32, 23))
    folded = lf.fold_model(model)  # the threshold plan: empty (every α is 0), pools and all kept
    rebuilt = lf.LayerFoldedNet(**json.loads(json.dumps(folded.model_args))).double()  # the pools survive JSON
    rebuilt.load_state_dict(folded.state_dict())
    x = torch.randn(1, 3, 29, 35, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), folded(x))

    class MyPool(torch.nn.AvgPool2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="cannot keep a MyPool: it subclasses AvgPool2d but has a forward of its own"):
        from hf_layerfold.folded_net import op_spec

        op_spec(MyPool(2))


def test_caller_model_untouched_and_folded_is_smaller():
    torch.manual_seed(0)
    model = lf.prepare_model(randomize_bn(timm.create_model("mobilenetv2_050", num_classes=10)).eval())
    for alpha in lf.alpha_parameters(model).values():
        alpha.data.fill_(0.95)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = lf.fold_model(model)  # plan from α ≥ threshold, applied to a copy
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert lf.fold_stats(folded, None).depth < lf.fold_stats(model, None).depth
    assert not any(isinstance(n, lf.FoldableActivation) for n in folded.modules())
    assert all(type(n).__name__ != "Identity" for n in folded.features)  # no no-op left on the forward path
    graph = build_graph(model)
    assert any(True for _ in iter_nodes(graph.features))


def test_a_float64_fold_shares_no_storage_with_the_caller():
    """A conv that merges with nothing and has no BatchNorm (MobileNetV3's head conv) was handed over by reference
    in float64: training the folded net changed the caller's model."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=4).double().eval()
    folded = lf.fold_model(model)
    ours = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(p.untyped_storage().data_ptr() in ours for p in folded.parameters())


def test_compute_limited_merging_is_exact_and_never_adds_macs():
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobilenetv2_100", num_classes=10)).double().eval()
    baseline = lf.fold_stats(lf.fold_model(model), 64)
    model = lf.prepare_model(model, lf.LayerFoldingConfig(max_macs_increase=0.0))
    sites = lf.foldable_sites(model)
    whole = [s for s in sites if s.startswith("blocks.3.1.")]  # a fully linear block: merging saves MACs
    partial = ["blocks.4.1.bn1.act", "blocks.5.0.bn2.act"]  # 1x1 into depthwise alone: merging would add MACs
    planned = lf.apply_plan(model, lf.FoldPlan(tuple(whole + partial)))
    folded = lf.fold_model(planned)
    after = lf.fold_stats(folded, 64)
    assert after.macs <= baseline.macs
    assert after.depth == baseline.depth - 2  # the whole block became one conv; the partial sites merged nothing
    assert after.nonlinear_layers == baseline.nonlinear_layers - 4
    x = torch.randn(1, 3, 41, 41, dtype=torch.float64)
    assert rel_err(planned(x), folded(x)) < 1e-10


def test_a_lone_conv_wider_than_the_kernel_limit_is_kept_under_a_macs_limit():
    """A conv alone is no merge: a 7×7 stem (or a 5×5 depthwise) stays when max_kernel_size is smaller, with
    max_macs_increase set too (this once left the run with no allowed split)."""
    torch.manual_seed(0)
    config = lf.LayerFoldingConfig(max_kernel_size=3, max_macs_increase=0.0)
    model = lf.prepare_model(randomize_bn(timm.create_model("resnet10t", num_classes=5)).double().eval(), config)
    sites = lf.foldable_sites(model)
    _check(model, lf.FoldPlan(tuple(sites[::2])), torch.float64, sizes=(33,))
    lite = BLOCK_MODELS["ds_ir_er_cn"]
    model = lf.prepare_model(randomize_bn(lite()).double().eval(), config)
    _check(model, lf.FoldPlan(tuple(lf.foldable_sites(model))), torch.float64, sizes=(29,))


def test_headless_model_folds_to_features():
    torch.manual_seed(0)
    model = lf.prepare_model(randomize_bn(timm.create_model("mobilenetv2_050", num_classes=0)).double().eval())
    _check(model, lf.FoldPlan(tuple(lf.foldable_sites(model)[:6])), torch.float64, sizes=(32,))
    with pytest.raises(TypeError, match=r"write FoldPlan\(\['bn1.act'\]\)"):
        lf.FoldPlan("bn1.act")
