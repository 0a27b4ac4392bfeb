"""Plans and stats on edge cases: JSON round trips of bad plans, empty plans, impossible plans, merge-cost MACs."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import timm
import torch

import hf_layerfold as lf
from hf_layerfold.graph import ConvNode
from hf_layerfold.padding import effective_kernel
from hf_layerfold.plan import _merge_cost, merged_shape
from hf_layerfold.prepare import ensure_prepared

pytestmark = pytest.mark.usefixtures("one_thread")


def _prepared(name: str = "mobilenetv2_050", **config) -> torch.nn.Module:
    return lf.prepare_model(timm.create_model(name, num_classes=10), lf.LayerFoldingConfig(blend="eager", **config))


def test_plan_json_with_a_string_or_bad_sites_is_refused_not_split_into_characters(tmp_path):
    for bad in ({"linear_sites": "blocks.1.0.bn1.act"}, {"linear_sites": None}, {"linear_sites": [1, "a"]}):
        with pytest.raises(ValueError, match="linear_sites must be a list of site names"):
            lf.FoldPlan.from_dict(bad)
    with pytest.raises(ValueError, match="a FoldPlan is a JSON object"):
        lf.FoldPlan.from_dict(["blocks.1.0.bn1.act"])
    with pytest.raises(TypeError, match="sequence of site names"):
        lf.FoldPlan(["a", 1])
    (tmp_path / "plan.json").write_text(json.dumps({"linear_sites": "bn1.act"}))
    with pytest.raises(ValueError, match=r"plan\.json: FoldPlan linear_sites must be a list"):
        lf.FoldPlan.load(tmp_path / "plan.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json is not a valid FoldPlan JSON file"):
        lf.FoldPlan.load(tmp_path / "broken.json")
    plan = lf.FoldPlan(["b", "a"])
    plan.save(tmp_path)
    assert lf.FoldPlan.load(tmp_path) == plan and lf.FoldPlan.load(tmp_path).linear_sites == ("a", "b")


def test_projected_stats_of_an_explicit_empty_plan_is_the_unfolded_network():
    model = _prepared()
    with torch.no_grad():
        for alpha in lf.alpha_parameters(model).values():
            alpha.fill_(1.0)  # every α past the threshold: the default plan folds everything
    empty = lf.projected_stats(model, lf.FoldPlan())
    unfolded = lf.fold_stats(lf.fold_model(model, lf.FoldPlan()), None)
    assert (empty.nonlinear_layers, empty.depth, empty.convs) == (unfolded.nonlinear_layers, unfolded.depth,
                                                                  unfolded.convs) == (35, 52, 52)
    full = lf.projected_stats(model)
    assert (full.nonlinear_layers, full.depth) == (1, 18)


def test_projected_stats_refuses_plans_that_apply_plan_refuses():
    model = _prepared("resnet10t")
    with pytest.raises(ValueError, match=r"not foldable in this model: \['layer1.0.act2'\]"):
        lf.projected_stats(model, lf.FoldPlan(["layer1.0.act2"]))  # after the residual add: not a site
    block = _prepared(alpha_sharing="block")
    with pytest.raises(ValueError, match="only some of the sites that share one α"):
        lf.projected_stats(block, lf.FoldPlan(["blocks.1.0.bn1.act"]))


def test_merge_cost_counts_macs_exactly_and_allows_what_the_limit_allows():
    """MACs per input pixel were floored (``scale * out * in // groups``) once strides made them fractional: the
    span below is within 3x of its parts exactly (2.95x), yet was refused, so the run split into one conv too many."""
    model = _prepared("lcnet_075", max_macs_increase=2.0)
    run = ["blocks.1.0.conv_pw", "blocks.1.1.conv_dw", "blocks.1.1.conv_pw", "blocks.2.0.conv_dw",
           "blocks.2.0.conv_pw", "blocks.2.1.conv_dw", "blocks.2.1.conv_pw", "blocks.3.0.conv_dw",
           "blocks.3.0.conv_pw"]
    convs = [ConvNode(n) for n in run]
    start, end = 4, 9
    mods = [model.get_submodule(n) for n in run]
    scale, parts = Fraction(1), Fraction(0)
    for i, conv in enumerate(mods[:end]):
        scale /= conv.stride[0] * conv.stride[1]
        if i >= start:
            kh, kw = effective_kernel(conv)
            parts += scale * conv.out_channels * Fraction(conv.in_channels, conv.groups) * kh * kw
    shape = merged_shape(model, convs[start:end])
    merged = scale * shape["out_channels"] * shape["in_channels"] * shape["kernel_size"][0] * shape["kernel_size"][1]
    assert 2 * parts < merged <= 3 * parts  # allowed under max_macs_increase=2.0
    assert _merge_cost(model, convs, start, end, model.layerfold_config) == pytest.approx(float(merged))
    assert lf.projected_stats(model, lf.FoldPlan(lf.foldable_sites(model))).convs == 20  # 21 with the floors


def test_an_int_or_default_input_size_follows_the_models_channels():
    """fold_stats(model, 32) fed 3 channels to a 1-channel model; the timing default took timm's (3, H, W)."""
    model = timm.create_model("test_efficientnet", num_classes=10, in_chans=1)
    assert lf.fold_stats(model, 32).macs == lf.fold_stats(model, (1, 32, 32)).macs > 0
    lf.prepare_model(model, lf.LayerFoldingConfig(blend="eager"))
    assert lf.fold_stats(lf.fold_model(model), 32).macs > 0
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 24, 24)}
    assert "conv_stem" in lf.measure_merge_costs(model, rounds=1, round_seconds=0.001, warmup=0)


def test_planned_weights_refuse_to_load_into_a_model_without_that_plan():
    planned = _prepared()
    lf.apply_plan(planned, lf.FoldPlan.from_blocks(planned, ["blocks.1.0"]))
    state = planned.state_dict()
    with pytest.raises(RuntimeError, match=r"searching \(no plan applied\) here but kept non-linear by a plan in the "
                                           r"state dict \(34 sites disagree\): apply the plan the weights record"):
        _prepared().load_state_dict(state, strict=False)  # loaded, it would miss the moved padding at the borders
    other = _prepared()
    lf.apply_plan(other, lf.FoldPlan.from_blocks(other, ["blocks.2.0"]))
    with pytest.raises(RuntimeError, match=r"kept non-linear by a plan here but made linear by a plan in the state "
                                           r"dict \(4 sites"):
        other.load_state_dict(state)
    same = _prepared()
    assert lf.FoldPlan.from_state_dict(same.state_dict()) is None  # a searching model's: no plan
    lf.apply_plan(same, lf.FoldPlan.from_state_dict(state))
    assert same.layerfold_plan == planned.layerfold_plan
    same.load_state_dict(state)
    x = torch.randn(1, 3, 40, 40)
    assert torch.equal(same.eval()(x), planned.eval()(x))
    older = {k: v for k, v in _prepared().state_dict().items() if not k.endswith("._extra_state")}
    assert not _prepared().load_state_dict(older).missing_keys  # written before sites recorded their phase


def test_the_config_a_plan_was_applied_with_decides_the_fold_and_is_what_a_save_records(tmp_path, caplog):
    model = _prepared()
    sites = lf.foldable_sites(model)
    lf.apply_plan(model, sites, lf.LayerFoldingConfig(max_kernel_size=3))  # site names: a plan as well
    assert model.layerfold_config.max_kernel_size == 3
    assert lf.fold_stats(lf.fold_model(model), 32).depth == lf.projected_stats(model).depth
    with caplog.at_level("WARNING"):
        path = lf.save_folded(model, tmp_path / "a", config=lf.LayerFoldingConfig(lambda_reg=0.5))
    assert "max_kernel_size" in caplog.text
    saved = lf.LayerFoldingConfig.from_pretrained(path)
    assert (saved.max_kernel_size, saved.lambda_reg) == (3, 0.5)
    replanned = lf.apply_plan(_prepared(), lf.FoldPlan.load(path), saved)
    assert lf.projected_stats(replanned).depth == lf.projected_stats(model).depth
    caplog.clear()
    with caplog.at_level("WARNING"):  # what LayerFoldingTrainer(model, layerfold_config=...) does with it
        assert ensure_prepared(model, lf.LayerFoldingConfig(lambda_reg=0.1)).max_kernel_size == 3
    assert "plan was applied with other max_kernel_size" in caplog.text


def test_plan_functions_take_site_names_and_name_what_they_refuse(tmp_path):
    model = _prepared()
    sites = lf.foldable_sites(model)[:3]
    assert lf.projected_stats(model, sites) == lf.projected_stats(model, lf.FoldPlan(sites))
    assert lf.projected_stats(model, sites).params is None  # counted by fold_stats, not projected
    assert lf.fold_stats(lf.fold_model(model, sites)).depth == lf.projected_stats(model, sites).depth
    with pytest.raises(TypeError, match="a FoldPlan or a list of site names, got the string 'bn1.act'"):
        lf.apply_plan(model, "bn1.act")
    for call in (lambda: lf.apply_plan("mobilenetv2_050", sites), lambda: lf.foldable_sites("mobilenetv2_050")):
        with pytest.raises(TypeError, match="takes a torch.nn.Module"):
            call()
    folded = lf.fold_model(model)
    for call in (lambda: lf.projected_stats(folded), lambda: lf.prepare_with_plan(folded, [])):
        with pytest.raises(ValueError, match="already folded"):
            call()
    assert lf.unique_alphas(lf.alpha_parameters(model)) == list(lf.alpha_parameters(model).values())
    assert lf.apply_plan(_prepared(), [], {"max_kernel_size": 5}).layerfold_config.max_kernel_size == 5  # a dict
    written = lf.FoldPlan(sites).save(f"{tmp_path}/new/")  # a path ending in a separator is a folder
    assert written == tmp_path / "new" / "layerfold_plan.json" and lf.FoldPlan.load(written) == lf.FoldPlan(sites)


def test_hooks_on_a_replaced_activation_are_named(caplog):
    model = timm.create_model("resnet10t", num_classes=3)
    model.get_submodule("conv1.5").register_forward_hook(lambda *a: None)
    with caplog.at_level("WARNING"):
        lf.prepare_model(model)
    assert "carry hooks (conv1.5)" in caplog.text


def test_state_dict_phases_read_through_wrappers_and_name_each_direction():
    planned = _prepared()
    lf.apply_plan(planned, lf.FoldPlan.from_blocks(planned, ["blocks.1.0"]))
    state = planned.state_dict()
    wrapped = {f"module._orig_mod.{k}": v for k, v in state.items()}  # DDP around torch.compile
    assert lf.FoldPlan.from_state_dict(wrapped) == planned.layerfold_plan
    mixed = {**_prepared().state_dict(), "blocks.1.0.bn1.act._extra_state": torch.tensor(2, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="mixes searching and planned sites"):
        lf.FoldPlan.from_state_dict(mixed)
    with pytest.raises(RuntimeError, match="these are a searching model's weights: load them into a prepared model "
                                           "without a plan"):
        planned.load_state_dict(_prepared().state_dict())


def test_hooks_of_a_replaced_activation_do_not_fire_half_the_time():
    model = timm.create_model("resnet10t", num_classes=3)
    calls = []
    model.get_submodule("conv1.2").register_forward_hook(lambda *a: calls.append(1))
    lf.prepare_model(model, lf.LayerFoldingConfig(blend="eager"))
    lf.apply_plan(model, [])  # every site kept non-linear: the copy inside runs its activation
    model.eval()(torch.randn(1, 3, 32, 32))
    assert calls == []  # not carried over (as the warning says), rather than run on some paths only


def test_planned_weights_load_across_alpha_sharing_and_wrapper_nesting():
    """A planned α is implied by its phase: weights planned with block-shared α (no α for the sites that share)
    load into a per-site planned model (``prepare_with_plan``) and back."""
    block = _prepared(alpha_sharing="block")
    plan = lf.FoldPlan.from_blocks(block, ["blocks.1.0", "blocks.2.0"])
    lf.apply_plan(block, plan)
    per_site = lf.prepare_with_plan(timm.create_model("mobilenetv2_050", num_classes=10), plan,
                                    lf.LayerFoldingConfig(blend="eager"))
    per_site.load_state_dict(block.state_dict())
    x = torch.randn(1, 3, 40, 40)
    assert torch.equal(per_site.eval()(x), block.eval()(x))
    block.load_state_dict(per_site.state_dict())
    nested = {f"_orig_mod.module.{k}": v for k, v in block.state_dict().items()}  # compile around DDP
    assert lf.FoldPlan.from_state_dict(nested) == plan


def test_an_alpha_equal_to_the_threshold_is_past_it_as_the_trainer_counts():
    """float(float32(0.9)) is 0.89999998 < 0.9: the plan left out sites the trainer's log counted as past."""
    model = lf.prepare_model(timm.create_model("resnet10t"), lf.LayerFoldingConfig(alpha_init=0.9, threshold=0.9))
    alphas = torch.stack(list(lf.alpha_parameters(model).values()))
    assert len(lf.FoldPlan.from_model(model)) == int((alphas >= 0.9).sum()) == len(alphas) > 0
    model.bfloat16()  # bf16(0.9) is 0.8984375: not past 0.9, for the plan as for the trainer's log
    assert len(lf.FoldPlan.from_model(model)) == 0


def test_whole_number_fields_given_as_floats_are_saved_as_integers():
    config = lf.LayerFoldingConfig(max_kernel_size=5.0, search_steps=10.0)
    assert type(config.max_kernel_size) is int and config.to_dict()["search_steps"] == 10


def test_block_names_where_sites_are_expected_are_pointed_to_from_blocks():
    model = lf.prepare_model(timm.create_model("mobilenetv2_050"))
    with pytest.raises(ValueError, match=r"\['blocks.1.1'\] name blocks: pass FoldPlan.from_blocks"):
        lf.apply_plan(model, lf.FoldPlan(["blocks.1.1"]))  # a FoldPlan names sites
    assert lf.projected_stats(model, ["blocks.1.1"]) == lf.projected_stats(
        model, lf.FoldPlan.from_blocks(model, ["blocks.1.1"]))  # a list of names is read as from_blocks reads it
    lf.apply_plan(model, ["blocks.1.1"])
    assert model.layerfold_plan == lf.FoldPlan.from_blocks(model, ["blocks.1.1"])


def test_from_model_reads_the_threshold_through_a_wrapper_and_apply_plan_names_an_ignored_config(caplog):
    model = lf.prepare_model(timm.create_model("resnet10t", num_classes=10), lf.LayerFoldingConfig(threshold=0.5))
    with torch.no_grad():
        lf.alpha_parameters(model)["layer1.0.act1"].fill_(0.6)
    wrapper = torch.nn.Module()
    wrapper.module = model  # (as DistributedDataParallel holds it)
    assert lf.FoldPlan.from_model(wrapper).linear_sites == ("layer1.0.act1",)
    with pytest.raises(TypeError, match="threshold must be a number"):
        lf.FoldPlan.from_model(model, threshold=float("nan"))
    import numpy as np

    for threshold in (torch.tensor(0.5), np.float32(0.5)):  # e.g. a quantile of the α: taken as before
        assert lf.FoldPlan.from_model(model, threshold=threshold).linear_sites == ("layer1.0.act1",)
    plan = lf.FoldPlan.from_model(model)
    lf.apply_plan(model, plan)
    with caplog.at_level("WARNING"):
        lf.apply_plan(model, plan, lf.LayerFoldingConfig(max_macs_increase=0.0))
    assert "apply_plan (the plan is applied already): the model's plan was applied with other max_macs_increase" \
        in caplog.text


def test_fold_stats_names_an_input_size_with_other_channels_than_the_model():
    model = timm.create_model("mobilenetv2_050", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="has 3 channel.s. but the model takes 1"):
        lf.fold_stats(model, model.pretrained_cfg["input_size"])
    assert lf.fold_stats(model, (1, 32, 32)).macs == lf.fold_stats(model, 32).macs


def test_macs_count_the_conv1d_of_eca_attention():
    """ecaresnet*'s channel attention is an nn.Conv1d, which the count left out (0.02 %, against torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model("ecaresnet26t", num_classes=4).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert lf.fold_stats(model, (3, 32, 32)).macs == counter.get_total_flops() // 2


def test_hooks_on_a_prepared_site_or_a_merging_conv_keep_firing(monkeypatch):
    """A hook put on a prepared site (as prepare_model's warning advises) fired in eval mode only: the fused
    BatchNorm + blend skipped the site module while training. apply_plan's PaddedConv2d dropped a merging conv's
    hooks without a word."""
    from timm.layers import BatchNormAct2d

    from hf_layerfold import activation, fused

    monkeypatch.setattr(activation, "_COMPILE_FAILED", False)
    region = BatchNormAct2d(4, act_layer=torch.nn.ReLU6).train()
    region.act = lf.FoldableActivation(region.act, "s", alpha_init=0.3, blend="compile")
    assert fused.fuse_batchnorm_blends(region) == 1
    calls = []
    region.act.register_forward_hook(lambda *a: calls.append("site"))
    region(torch.randn(2, 4, 5, 5))
    region.eval()(torch.randn(2, 4, 5, 5))
    assert calls == ["site", "site"]
    model = _prepared()
    handle = model.get_submodule("blocks.1.0.conv_pw").register_forward_hook(lambda *a: calls.append("conv"))
    lf.apply_plan(model, lf.FoldPlan.from_blocks(model, ["blocks.1.0"]))
    assert type(model.get_submodule("blocks.1.0.conv_pw")).__name__ == "PaddedConv2d"
    model.eval()(torch.randn(1, 3, 32, 32))
    handle.remove()  # (the handle still reaches the hook it registered)
    model(torch.randn(1, 3, 32, 32))
    assert calls.count("conv") == 1


def test_a_hardtanh_network_prepares_folds_and_reloads(tmp_path):
    """README names Hardtanh among the sites with fast blends, yet a folded net could not keep one (refused)."""
    import functools

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3, act_layer=functools.partial(torch.nn.Hardtanh, -1.0, 2.0))
    x = torch.randn(2, 3, 33, 33)
    want = model.eval()(x)
    planned = lf.prepare_model(model, lf.LayerFoldingConfig(blend="eager"))
    torch.testing.assert_close(planned(x), want, rtol=0, atol=0)
    lf.apply_plan(planned, lf.foldable_sites(planned)[::2])
    folded = lf.fold_model(planned)
    torch.testing.assert_close(folded(x), planned(x), rtol=1e-4, atol=1e-5)
    loaded = lf.LayerFoldedModel.from_pretrained(lf.save_folded(planned, tmp_path / "s"))
    torch.testing.assert_close(loaded(x), folded(x), rtol=0, atol=0)
    kept = [m for m in loaded.modules() if type(m) is torch.nn.Hardtanh]
    assert kept and all((m.min_val, m.max_val) == (-1.0, 2.0) for m in kept)


def test_api_arguments_are_checked_as_the_config_checks_them():
    """FoldPlan.from_model took any threshold (90, a percentage, planned nothing; 0 every site);
    alpha_parameters of a model name failed with a bare AttributeError."""
    model = _prepared()
    for bad in (1.5, 90, 0, -1):
        with pytest.raises(ValueError, match=rf"threshold must lie in \(0, 1\].*got {bad}"):
            lf.FoldPlan.from_model(model, threshold=bad)
    with pytest.raises(TypeError, match="alpha_parameters"):
        lf.alpha_parameters("mobilenetv2_050")


def test_folding_a_searching_model_says_when_its_threshold_plan_rounds_alpha(tmp_path, caplog):
    """fold_model and save_folded of a model still searching fold its threshold plan: with soft α that net computes
    something else (0.85 relative error here), and nothing said so."""
    model = _prepared()
    with caplog.at_level("WARNING"):
        lf.fold_model(model)  # α all exactly 0: the plan changes nothing
    assert "rounds the α" not in caplog.text
    for alpha in list(lf.alpha_parameters(model).values())[::2]:
        alpha.data.fill_(0.95)
    with caplog.at_level("WARNING"):
        lf.fold_model(model)
        lf.save_folded(model, tmp_path / "s")
    assert "fold_model: the model is still searching, and its threshold plan rounds the α of 17 site(s)" in caplog.text
    assert "save_folded: the model is still searching" in caplog.text
