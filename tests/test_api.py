"""Config, preparation, plans, statistics and their errors."""

import json
import warnings

import pytest
import timm
import torch
from conftest import randomize_bn, rel_err

import hf_layerfold as lf
from hf_layerfold.config import LAYERFOLD_CONFIG_NAME


def small(name="mobilenetv2_050", **kw):
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, num_classes=10, **kw)).eval()


def test_the_library_without_the_trainer_imports_no_transformers():
    """Folding, saving and the metric function work without transformers loaded; the trainer loads it when asked."""
    import subprocess
    import sys

    code = ("import sys, hf_layerfold as lf; lf.compute_metrics; assert 'transformers' not in sys.modules; "
            "lf.LayerFoldingTrainer; assert 'transformers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_config_json_round_trip(tmp_path):
    cfg = lf.LayerFoldingConfig(lambda_reg=0.5, regularizer="l1", threshold=0.8, exclude_modules=["bn1.act"],
                                max_kernel_size=5, fold_residual=False)
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / LAYERFOLD_CONFIG_NAME).read_text())["lambda_reg"] == 0.5
    assert lf.LayerFoldingConfig.from_pretrained(tmp_path) == cfg
    assert lf.LayerFoldingConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("field,value", [("lambda_reg", -1.0), ("threshold", 0.0), ("threshold", 1.5),
                                         ("regularizer", "l2"), ("max_kernel_size", 0), ("alpha_init", 2.0),
                                         ("alpha_sharing", "layer"), ("alpha_lr", "1e-3"),
                                         ("lambda_reg", float("nan")), ("search_steps", 2.5), ("threshold", True),
                                         ("fold_residual", "no"), ("target_modules", 5), ("max_kernel_size", [3])])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"LayerFoldingConfig.{field}=.* is invalid"):  # a wrong type too
        lf.LayerFoldingConfig(**{field: value})


def test_config_rejects_unknown_json_keys(tmp_path):
    (tmp_path / LAYERFOLD_CONFIG_NAME).write_text(json.dumps({"lambda_reg": 0.1, "lamda": 3}))
    with pytest.raises(ValueError, match="lamda"):
        lf.LayerFoldingConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        lf.LayerFoldingConfig.from_pretrained(tmp_path / "nowhere")


def test_prepare_wraps_candidates_and_keeps_outputs():
    model = small()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    keys = set(model.state_dict())
    lf.prepare_model(model)
    sites = lf.foldable_sites(model)
    assert len(sites) == 34  # every activation of MobileNetV2 except the head's
    assert all(isinstance(model.get_submodule(s), lf.FoldableActivation) for s in sites)
    assert set(model.state_dict()) == keys | {f"{s}.alpha" for s in sites} | {f"{s}._extra_state" for s in sites}
    assert torch.allclose(model(x), ref, atol=1e-6)  # α = 0 is the original activation
    assert all(p.dim() == 0 and float(p.detach()) == 0.0 for p in lf.alpha_parameters(model).values())
    with pytest.raises(ValueError, match="already prepared"):
        lf.prepare_model(model)


def test_foldable_activation_interpolates():
    act = lf.FoldableActivation(torch.nn.ReLU(inplace=True), "s", alpha_init=0.25)
    x = torch.randn(100)
    assert torch.allclose(act(x), 0.75 * torch.relu(x) + 0.25 * x)
    assert not act.act.inplace  # x is needed after the activation
    act.fix(linear=True)
    assert torch.equal(act(x), x) and not act.alpha.requires_grad


@pytest.mark.parametrize("blend", ["eager", "compile", "auto"])
@pytest.mark.parametrize("make_act", [torch.nn.ReLU6, torch.nn.ReLU, lambda: torch.nn.Hardtanh(-1.0, 2.0),
                                      torch.nn.SiLU], ids=["relu6", "relu", "hardtanh", "silu"])
def test_blend_paths_match_the_definition_in_float64(blend, make_act, monkeypatch):
    """Every fast path (PReLU, the hand-written clamp backward, the compiled kernel) computes the same values and
    gradients, for x and α, as autograd through (1 − α)·act(x) + α·x."""
    from hf_layerfold import activation

    monkeypatch.setattr(activation, "AUTO_COMPILE_MIN_NUMEL", 0)  # "auto": the compiled path even at this size
    monkeypatch.setattr(activation, "_COMPILE_FAILED", False)
    torch.manual_seed(0)
    for act_alpha in (0.0, 0.3):  # α = 0 is where a wrong α-gradient would hide behind a zero blend
        site = lf.FoldableActivation(make_act(), "s", alpha_init=act_alpha, blend=blend).double()
        x = 4 * torch.randn(2, 3, 5, 7, dtype=torch.float64)
        x.view(-1)[:4] = torch.tensor([0.0, 6.0, -1.0, 2.0])  # on the clamps' bounds (a compiled clamp gave 0.5 there)
        x.requires_grad_()
        g = torch.randn_like(x)
        site(x).backward(g)
        ref_x = x.detach().clone().requires_grad_()
        ref_alpha = site.alpha.detach().clone().requires_grad_()
        ref = (1 - ref_alpha) * make_act()(ref_x) + ref_alpha * ref_x
        ref.backward(g)
        assert rel_err(site(x), ref) < 1e-12
        assert rel_err(x.grad, ref_x.grad) < 1e-12
        assert abs(float(site.alpha.grad) - float(ref_alpha.grad)) < 1e-10 * max(1.0, abs(float(ref_alpha.grad)))
    assert not activation._COMPILE_FAILED  # "auto" compiled rather than fell back


@pytest.mark.parametrize("blend", ["compile", "auto"])
def test_compiled_batchnorm_blend_trains_like_eager_in_float64(blend, monkeypatch):
    """blend="compile" (and "auto" on CPU) runs BatchNorm + blend as one compiled region: same outputs, gradients
    (input, weights, α) and running statistics as timm's eager BatchNormAct2d + blend, and timm's own forward once
    the plan is fixed."""
    from timm.layers import BatchNormAct2d

    from hf_layerfold import activation
    from hf_layerfold.fused import BatchNormBlend2d, fuse_batchnorm_blends

    monkeypatch.setattr(activation, "AUTO_COMPILE_MIN_NUMEL", 0)
    monkeypatch.setattr(activation, "_COMPILE_FAILED", False)
    torch.manual_seed(0)

    def bn_act(blend):
        module = BatchNormAct2d(6, act_layer=torch.nn.ReLU6).double().train()
        module.act = lf.FoldableActivation(module.act, "s", alpha_init=0.3, blend=blend).double()
        with torch.no_grad():
            module.weight.uniform_(0.5, 2.0)
            module.bias.uniform_(-1.0, 1.0)
        return module

    eager, fused = bn_act("eager"), bn_act(blend)
    fused.load_state_dict(eager.state_dict())
    assert fuse_batchnorm_blends(fused) == 1 and type(fused) is BatchNormBlend2d
    for size in (5, 7):  # two spatial sizes through one compiled graph; two steps of running statistics
        x = (3 * torch.randn(3, 6, size, size, dtype=torch.float64)).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        out_e, out_f = eager(x), fused(x2)
        assert rel_err(out_f, out_e) < 1e-12
        g = torch.randn_like(out_e)
        out_e.backward(g)
        out_f.backward(g)
        assert rel_err(x2.grad, x.grad) < 1e-10
    for (name, p_e), p_f in zip(eager.named_parameters(), fused.parameters()):
        assert rel_err(p_f.grad, p_e.grad) < 1e-10, name
    for key, value in eager.state_dict().items():
        assert torch.allclose(fused.state_dict()[key].double(), value.double(), rtol=1e-12, atol=1e-14), key
    assert not activation._COMPILE_FAILED  # "auto" compiled rather than fell back
    fused.act.fix(linear=True)
    eager.act.fix(linear=True)
    assert torch.equal(fused(x), eager(x))  # a fixed plan: timm's forward


@pytest.mark.parametrize("blend", ["compile", "auto"])
def test_compile_blend_fuses_every_batchnorm_site_of_a_timm_model(blend):
    from hf_layerfold.fused import BatchNormBlend2d

    eager = lf.prepare_model(small(), lf.LayerFoldingConfig(blend="eager"))
    fused = lf.prepare_model(small(), lf.LayerFoldingConfig(blend=blend))
    assert not any(isinstance(m, BatchNormBlend2d) for m in eager.modules())
    assert sum(isinstance(m, BatchNormBlend2d) for m in fused.modules()) == len(lf.foldable_sites(fused)) == 34
    assert set(fused.state_dict()) == set(eager.state_dict())  # checkpoints and saves are unchanged


def test_auto_blend_compiles_large_cpu_tensors_and_falls_back_when_the_compiler_fails(monkeypatch):
    """blend="auto" leaves small CPU tensors to the eager blend and compiles large ones. On a machine where
    torch.compile cannot run it warns once, then trains on the eager blend: the fused BatchNorm region takes timm's
    forward (counting the batch once) and a lone site takes the eager blend."""
    from timm.layers import BatchNormAct2d

    from hf_layerfold import activation, fused

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(activation, "_COMPILE_FAILED", False)
    monkeypatch.setattr(fused, "compiled_bn_blend", broken)
    monkeypatch.setattr(activation, "compiled_clamp_blend", broken)
    torch.manual_seed(0)
    module = BatchNormAct2d(4, act_layer=torch.nn.ReLU6).double().train()
    module.act = lf.FoldableActivation(module.act, "s", alpha_init=0.3).double()
    reference = BatchNormAct2d(4, act_layer=torch.nn.ReLU6).double().train()
    reference.act = lf.FoldableActivation(reference.act, "s", alpha_init=0.3, blend="eager").double()
    assert fused.fuse_batchnorm_blends(module) == 1
    small_x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # too small to compile: the broken compiler is never asked
        assert torch.equal(module(small_x), reference(small_x))
    x = 3 * torch.randn(2, 4, 96, 96, dtype=torch.float64)
    assert x.numel() >= activation.AUTO_COMPILE_MIN_NUMEL
    with pytest.warns(RuntimeWarning, match="torch.compile failed for the blend"):
        out = module(x)
    assert activation._COMPILE_FAILED
    assert torch.equal(out, reference(x))
    assert int(module.num_batches_tracked) == 2 and torch.equal(module.running_var, reference.running_var)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the failure is remembered
        assert torch.equal(module(x), reference(x))
    monkeypatch.setattr(activation, "_COMPILE_FAILED", False)  # a lone site (no BatchNorm of its own) likewise
    lone = lf.FoldableActivation(torch.nn.ReLU6(), "s", alpha_init=0.3).double()
    eager = lf.FoldableActivation(torch.nn.ReLU6(), "s", alpha_init=0.3, blend="eager").double()
    with pytest.warns(RuntimeWarning, match="torch.compile failed for the blend"):
        assert torch.equal(lone(x), eager(x))
    assert activation._COMPILE_FAILED


def test_auto_blend_leaves_the_fast_path_on_for_errors_of_the_input(monkeypatch):
    """A wrong input fails the eager blend too: that error is the caller's and is raised as is, with no warning
    and no switch to the eager path."""
    from timm.layers import BatchNormAct2d

    from hf_layerfold import activation, fused

    monkeypatch.setattr(activation, "_COMPILE_FAILED", False)
    module = BatchNormAct2d(8, act_layer=torch.nn.ReLU6).train()
    module.act = lf.FoldableActivation(module.act, "s", alpha_init=0.3)
    fused.fuse_batchnorm_blends(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):
            module(torch.randn(2, 16, 64, 64))  # 16 channels into an 8-channel BatchNorm
    assert not activation._COMPILE_FAILED


def test_a_ctrl_c_that_the_compiler_wrapped_stops_instead_of_switching_to_the_eager_path(monkeypatch):
    """A Ctrl-C during the first compile came back from torch as another exception; blend="auto" took it for a
    compile failure, warned, and trained on in the eager blend."""
    from hf_layerfold import activation

    monkeypatch.setattr(activation, "_COMPILE_FAILED", False)

    def compiled():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise TypeError("unhashable type: non-nested SymInt") from stop  # as torch re-raises it

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyboardInterrupt):
            activation.fast_or_eager(compiled, lambda: pytest.fail("eager ran"), "_COMPILE_FAILED", "compile")
    assert not activation._COMPILE_FAILED


def test_a_compile_failure_while_a_caught_ctrl_c_is_handled_still_falls_back_to_eager(monkeypatch):
    """The Ctrl-C the caller is handling is the context of every later error, not a stop of this call."""
    from hf_layerfold import activation

    monkeypatch.setattr(activation, "_COMPILE_FAILED", False)

    def compiled():
        raise RuntimeError("no working C++ compiler")

    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        with pytest.warns(RuntimeWarning, match="no working C.. compiler"):
            assert activation.fast_or_eager(compiled, lambda: "eager", "_COMPILE_FAILED", "compile") == "eager"
    assert activation._COMPILE_FAILED


def test_config_blend_reaches_every_site_and_bad_blend_is_named():
    model = lf.prepare_model(small(), lf.LayerFoldingConfig(blend="compile"))
    assert {m.blend for m in model.modules() if isinstance(m, lf.FoldableActivation)} == {"compile"}
    with pytest.raises(ValueError, match="blend"):
        lf.LayerFoldingConfig(blend="fused")


def test_target_and_exclude_patterns():
    model = lf.prepare_model(small(), lf.LayerFoldingConfig(target_modules=["blocks.1*", "blocks.2"],
                                                            exclude_modules=["re:.*bn2\\.act"]))
    sites = lf.foldable_sites(model)
    assert sites and all(s.startswith(("blocks.1", "blocks.2")) and not s.endswith("bn2.act") for s in sites)
    with pytest.raises(ValueError, match="select no site"):
        lf.prepare_model(small(), lf.LayerFoldingConfig(target_modules=["nothing.*"]))


def test_a_pattern_matching_no_site_is_named_and_prepare_keeps_the_models_mode(caplog):
    with caplog.at_level("WARNING", logger="hf_layerfold.prepare"):
        model = lf.prepare_model(small(), lf.LayerFoldingConfig(target_modules=["blocks.1.*", "blcks.2.*"],
                                                                exclude_modules=["blcks.3.*"]))
    assert "target_modules pattern(s) ['blcks.2.*'] match no foldable site" in caplog.text
    assert "exclude_modules pattern(s) ['blcks.3.*']" in caplog.text
    assert not any(m.training for m in model.modules())  # small() is in eval mode; the new sites too
    assert lf.foldable_sites(lf.fold_model(model)) == []  # folded: nothing left to fold (it was an error)


@pytest.mark.parametrize("act_layer", ["gelu_tanh", "quick_gelu", "selu", "celu", "hard_mish"])
def test_timm_activations_by_name_fold(act_layer):
    """timm builds its own classes for these names (GELUTanh, QuickGELU, ...): they were refused as unknown."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobilenetv2_050", num_classes=5, act_layer=act_layer)).double().eval()
    model = lf.prepare_model(model)
    planned = lf.apply_plan(model, lf.FoldPlan(tuple(lf.foldable_sites(model)[::2])))
    x = torch.randn(1, 3, 29, 33, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(lf.fold_model(planned)(x), planned(x)) < 1e-10


def test_a_parametric_activation_keeps_its_parameter_objects():
    prelu = torch.nn.PReLU(3)
    site = lf.FoldableActivation(prelu, "s")
    assert site.act.weight is prelu.weight  # (it was a copy: an optimizer built before prepare lost it)


def test_block_shared_alpha_ties_sites_survives_copies_and_plans_whole_blocks():
    model = lf.prepare_model(small(), lf.LayerFoldingConfig(alpha_sharing="block", alpha_init=0.2))
    sites = lf.alpha_parameters(model)
    owners = {m.site: m.alpha_owner for m in model.modules() if isinstance(m, lf.FoldableActivation)}
    assert owners["blocks.1.0.bn2.act"] == "blocks.1.0.bn1.act" and owners["blocks.0.0.bn1.act"] == "blocks.0.0.bn1.act"
    assert sites["blocks.1.0.bn2.act"] is sites["blocks.1.0.bn1.act"]
    assert sites["blocks.1.0.bn1.act"] is not sites["blocks.1.1.bn1.act"]
    n_unique = len({id(a) for a in sites.values()})
    assert n_unique == len({o for o in owners.values()}) < len(sites)
    assert len([k for k in model.state_dict() if k.endswith(".alpha")]) == n_unique
    assert "site='blocks.1.0.bn2.act'" in repr(model) and "alpha_of='blocks.1.0.bn1.act'" in repr(model)

    copy = __import__("copy").deepcopy(model)  # ties survive a copy and a state-dict round trip
    copied = lf.alpha_parameters(copy)
    assert copied["blocks.1.0.bn2.act"] is copied["blocks.1.0.bn1.act"]
    sites["blocks.1.0.bn1.act"].data.fill_(0.95)
    copy.load_state_dict(model.state_dict())
    assert copied["blocks.1.0.bn2.act"].item() == pytest.approx(0.95)

    plan = lf.FoldPlan.from_model(model, threshold=0.9)  # both sites of the block, from the one α
    assert plan.linear_sites == ("blocks.1.0.bn1.act", "blocks.1.0.bn2.act")
    with pytest.raises(ValueError, match="share one α"):
        lf.apply_plan(__import__("copy").deepcopy(model), lf.FoldPlan(("blocks.1.0.bn1.act",)))
    lf.apply_plan(model, plan)
    x = torch.randn(2, 3, 64, 64)
    assert rel_err(lf.fold_model(model)(x), model(x)) < 1e-5


def test_compiled_model_with_shared_alpha_matches_eager():
    """torch.compile (one graph, no break) reads a site's shared α through the attribute lookup; forward only, on a
    small net, to keep the compile short."""
    from timm.models import efficientnet
    from timm.models._efficientnet_builder import decode_arch_def

    torch.manual_seed(0)
    arch = [["ds_r1_k3_s1_c8"], ["ir_r2_k3_s2_e3_c16"]]
    net = efficientnet.EfficientNet(decode_arch_def(arch), num_classes=10, stem_size=8, num_features=32)
    model = lf.prepare_model(randomize_bn(net), lf.LayerFoldingConfig(alpha_sharing="block")).double().eval()
    for i, alpha in enumerate(lf.unique_alphas(lf.alpha_parameters(model).values())):
        alpha.data.fill_(0.1 + 0.2 * i)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(torch.compile(model, fullgraph=True)(x), model(x)) < 1e-12


def test_unsupported_model_names_supported_blocks():
    with pytest.raises(lf.UnsupportedModelError, match="InvertedResidual"):
        lf.prepare_model(timm.create_model("vit_tiny_patch16_224", img_size=32))
    # a supported family with a module the folded net could not keep: refused before training, by path
    with pytest.raises(lf.UnsupportedModelError, match=r"could not keep .*layer2\.0\.aa \(BlurPool2d\)"):
        lf.prepare_model(timm.create_model("resnetblur18", num_classes=5))
    folded = lf.fold_model(small())
    for call in (lf.prepare_model, lf.fold_model):
        with pytest.raises(ValueError, match="already folded"):
            call(folded)
    for call in (lf.prepare_model, lf.fold_model):  # (an AttributeError from deep inside before)
        with pytest.raises(TypeError, match=r"takes a torch\.nn\.Module .*got str; build the model first"):
            call("resnet18")


def test_plan_from_model_json_and_unknown_sites(tmp_path):
    model = lf.prepare_model(small(), lf.LayerFoldingConfig(threshold=0.9))
    alphas = lf.alpha_parameters(model)
    names = list(alphas)
    alphas[names[0]].data.fill_(0.95)
    alphas[names[1]].data.fill_(0.89)
    plan = lf.FoldPlan.from_model(model)
    assert plan.linear_sites == (names[0],)
    plan.save(tmp_path)
    assert lf.FoldPlan.load(tmp_path) == plan
    with pytest.raises(ValueError, match="not foldable"):
        lf.apply_plan(model, lf.FoldPlan(("blocks.0.0.nope",)))
    with pytest.raises(ValueError, match="no foldable site inside") as err:
        lf.FoldPlan.from_blocks(model, ["blocks.99"])
    assert "the model's blocks are bn1.act, blocks.0.0, blocks.1.0, blocks.1.1," in str(err.value)  # module order
    with pytest.raises(TypeError, match="a list of block or site names"):
        lf.FoldPlan.from_blocks(model, "blocks.1.1")


def test_a_site_name_in_from_blocks_fuses_expand_and_depthwise_exactly():
    model = lf.prepare_model(small()).double()
    plan = lf.FoldPlan.from_blocks(model, ["blocks.2.0.bn1.act", "blocks.3.1"])
    assert plan.linear_sites == ("blocks.2.0.bn1.act", "blocks.3.1.bn1.act", "blocks.3.1.bn2.act")
    before = lf.fold_stats(model, 32)
    lf.apply_plan(model, plan)
    folded = lf.fold_model(model)
    x = torch.randn(2, 3, 37, 45, dtype=torch.float64)
    assert torch.allclose(folded(x), model(x), rtol=1e-10, atol=1e-10)
    expand = model.get_submodule("blocks.2.0.conv_pw")
    shapes = {(m.in_channels, m.out_channels, m.groups, m.kernel_size, m.stride) for m in folded.modules()
              if isinstance(m, torch.nn.Conv2d)}
    assert (expand.in_channels, expand.out_channels, 1, (3, 3), (2, 2)) in shapes  # expand ∘ depthwise: one dense conv
    after = lf.fold_stats(folded, 32)
    assert (before.nonlinear_layers - after.nonlinear_layers, before.depth - after.depth) == (3, 3)


def test_prepare_with_plan_gives_each_site_its_own_alpha_and_checks_the_plan_first():
    config = lf.LayerFoldingConfig(alpha_sharing="block", exclude_modules=["blocks.4.0.bn1.act"])
    model = lf.prepare_with_plan(small(), ["blocks.1.0.bn1.act", "blocks.2.1"], config)
    assert model.layerfold_config.alpha_sharing == "site" and config.alpha_sharing == "block"  # the caller's config
    assert model.layerfold_plan.linear_sites == ("blocks.1.0.bn1.act", "blocks.2.1.bn1.act", "blocks.2.1.bn2.act")
    assert not any(a.requires_grad for a in lf.alpha_parameters(model).values())  # no search
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(lf.fold_model(model)(x), model(x), atol=1e-5)
    plain = small()
    for plan, message in ((["blocks.99"], "no foldable site inside"), (["blocks.4.0"], "leave out"),
                          (lf.FoldPlan(("blocks.0.0.nope",)), "not foldable")):
        with pytest.raises(ValueError, match=message):
            lf.prepare_with_plan(plain, plan, config)
        assert not any(isinstance(m, lf.FoldableActivation) for m in plain.modules())  # the model did not change
    with pytest.raises(ValueError, match="already prepared"):
        lf.prepare_with_plan(model, ["blocks.2.1"])


def test_apply_plan_fixes_alpha_and_keeps_parameters():
    model = lf.prepare_model(small())
    params_before = {id(p) for p in model.parameters()}
    for a in lf.alpha_parameters(model).values():
        a.data.fill_(0.5)
    plan = lf.FoldPlan.from_blocks(model, ["blocks.2.1", "blocks.3.0"])
    lf.apply_plan(model, plan)
    assert {id(p) for p in model.parameters()} == params_before  # an optimizer built earlier keeps working
    for site, a in lf.alpha_parameters(model).items():
        assert float(a.detach()) == (1.0 if site in plan.linear_sites else 0.0) and not a.requires_grad
    assert lf.apply_plan(model, plan) is model  # same plan again: no-op
    with pytest.raises(ValueError, match="different plan"):
        lf.apply_plan(model, lf.FoldPlan())
    with pytest.raises(ValueError, match="prepare_model"):
        lf.apply_plan(small(), plan)


def test_stats_before_and_after():
    model = lf.prepare_model(small("mobilenetv2_100"))
    before = lf.fold_stats(model, 64)
    assert (before.nonlinear_layers, before.depth, before.convs) == (35, 52, 52)
    plan = lf.FoldPlan.from_blocks(model, ["blocks.1.1", "blocks.2.1", "blocks.3.1", "blocks.3.2", "blocks.4.0"])
    projected = lf.projected_stats(model, plan)
    lf.apply_plan(model, plan)
    folded = lf.fold_model(model)
    after = lf.fold_stats(folded, 64)
    assert (after.nonlinear_layers, after.depth, after.convs) == (25, 42, 42)  # the published LF plan's shape
    assert (projected.nonlinear_layers, projected.depth) == (after.nonlinear_layers, after.depth)
    assert after.params == sum(p.numel() for p in folded.parameters()) and after.macs > 0
    assert before.params == sum(p.numel() for p in model.parameters()) - len(lf.alpha_parameters(model))


def test_folded_net_rebuilds_from_its_spec_alone():
    model = lf.prepare_model(small("tf_efficientnet_lite0"))
    lf.apply_plan(model, lf.FoldPlan(tuple(lf.foldable_sites(model)[::2])))
    folded = lf.fold_model(model)
    args = json.loads(json.dumps(folded.model_args))  # JSON-able
    rebuilt = lf.LayerFoldedNet(**args)
    rebuilt.load_state_dict(folded.state_dict())
    x = torch.randn(1, 3, 33, 33)
    assert torch.equal(rebuilt.eval()(x), folded(x))
    assert rel_err(model(x), folded(x)) < 1e-5
    feats = folded.forward_features(x)
    assert folded.forward_head(feats, pre_logits=True).shape == (1, folded.num_features)
    folded.reset_classifier(3)
    assert folded(x).shape == (1, 3) and folded.get_classifier().out_features == 3
    # the plain average-pool head takes a shortcut past its modules; it computes what the modules compute
    feats = folded.forward_features(x)
    assert torch.equal(folded.forward_head(feats, pre_logits=True), folded.global_pool(feats))
    folded.reset_classifier(3, global_pool="max")  # any other pooling goes through the modules
    assert torch.equal(folded.forward_head(feats, pre_logits=True), feats.amax((2, 3)))


@pytest.mark.parametrize("pool", ["", "catavgmax"])
def test_folded_heads_are_timm_heads(pool):
    """global_pool='' (the feature map out) became average pooling, flattened; a reset to catavgmax sized the
    classifier for half its input."""
    torch.manual_seed(0)  # (timm itself cannot classify unpooled features: no classifier with '')
    base = randomize_bn(timm.create_model("mobilenetv2_050", num_classes=4 if pool else 0, global_pool=pool)).eval()
    folded = lf.fold_model(lf.prepare_with_plan(base, ["blocks.1.1"], lf.LayerFoldingConfig()))
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        assert rel_err(base.eval()(x), folded(x)) < 1e-5 and folded(x).shape == base(x).shape
        rebuilt = lf.LayerFoldedNet(**json.loads(json.dumps(folded.model_args)))
        rebuilt.load_state_dict(folded.state_dict())  # (a catavgmax classifier takes twice the features)
        assert torch.equal(rebuilt.eval()(x), folded(x))
        for num_classes, other in ((0, ""), (5, "catavgmax"), (3, "avg")):
            base.reset_classifier(num_classes, other)
            folded.reset_classifier(num_classes, other)
            assert folded(x).shape == base(x).shape
        folded.double().reset_classifier(2)  # the new head in the net's dtype, as timm makes it
        assert folded(x.double()).dtype == torch.float64


def test_custom_block_rule_is_one_small_rule():
    from hf_layerfold.graph import BLOCK_RULES, ActNode, ConvNode, register_block_rule

    class TwoConv(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.bn, self.act, self.b = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c), \
                torch.nn.ReLU(), torch.nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return self.b(self.act(self.bn(self.a(x))))

    try:
        @register_block_rule(TwoConv)
        def two_conv(block, path):
            return [ConvNode(f"{path}.a", f"{path}.bn"), ActNode(f"{path}.act"), ConvNode(f"{path}.b")]

        model = timm.create_model("resnet18", num_classes=4)
        model.layer1[0] = TwoConv(64)
        model = lf.prepare_model(randomize_bn(model).eval())
        assert "layer1.0.act" in lf.foldable_sites(model)
        lf.apply_plan(model, lf.FoldPlan(("layer1.0.act",)))
        x = torch.randn(1, 3, 40, 40)
        assert rel_err(model(x), lf.fold_model(model)(x)) < 1e-5
    finally:
        BLOCK_RULES.pop(TwoConv, None)


def test_a_subclass_with_its_own_forward_is_not_folded_by_its_parents_rule():
    """timm's ResNet takes any block class: a BasicBlock subclass computing otherwise was folded by BasicBlock's rule
    (relative error 2.8), a ResNet subclass with its own forward_features by ResNet's."""
    from timm.models.resnet import BasicBlock, ResNet

    class HalfBranch(BasicBlock):
        def forward(self, x):
            return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) * 0.5 + x)

    class SameBlock(BasicBlock):  # no forward of its own: the parent's rule still describes it
        pass

    with pytest.raises(lf.UnsupportedModelError, match=r"HalfBranch, a subclass of .*BasicBlock with its own forward"
                                                        r".*register_block_rule\(HalfBranch\)\(hf_layerfold.rules.basic"):
        lf.prepare_model(timm.create_model("resnet18", num_classes=4, block=HalfBranch))
    lf.prepare_model(timm.create_model("resnet18", num_classes=4, block=SameBlock))

    class OwnFeatures(ResNet):
        def forward_features(self, x):
            return super().forward_features(x) * 2

    with pytest.raises(lf.UnsupportedModelError, match="with its own forward_features"):
        lf.prepare_model(OwnFeatures(BasicBlock, [1, 1, 1, 1], num_classes=4))


def test_rule_registration_and_malformed_rules_are_named():
    """A bare decorator registered nothing; an instance or a name broke every later 'unsupported' message; a rule
    returning something other than nodes failed deep inside prepare with a bare TypeError or AttributeError."""
    from hf_layerfold.graph import BLOCK_RULES, ConvNode, register_block_rule

    class Two(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.bn = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)

        def forward(self, x):
            return self.bn(self.a(x))

    with pytest.raises(TypeError, match=r"write @register_block_rule\(MyClass\) above the rule"):
        @register_block_rule
        def bare(block, path):
            return []
    for wrong in (Two(4), "Two"):
        with pytest.raises(TypeError, match="register_block_rule takes classes"):
            register_block_rule(wrong)
    for returned, said in ((None, "returned a NoneType, not a list of nodes"),
                           (["layer1.0.a"], r"returned 'layer1.0.a' at \[0\]: a node must be a ConvNode"),
                           ([ConvNode(conv=0)],
                            r"returned ConvNode\(conv=0, bn=None\) at \[0\]: a node names its modules by their path")):
        try:
            register_block_rule(Two)(lambda block, path, returned=returned: returned)
            model = timm.create_model("resnet18", num_classes=4)
            model.layer1[0] = Two(64)
            with pytest.raises(lf.UnsupportedModelError, match=rf"rule .* of block 'layer1.0' \(Two\) {said}"):
                lf.prepare_model(model)
        finally:
            BLOCK_RULES.pop(Two, None)


def test_a_rule_leaving_out_the_activation_of_a_batchnormact_is_refused():
    """The folded net silently dropped the activation timm's BatchNormAct2d applies after its norm."""
    from timm.layers import BatchNormAct2d

    from hf_layerfold.graph import BLOCK_RULES, ConvNode, register_block_rule

    class NormAct(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.bn = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), BatchNormAct2d(c)

        def forward(self, x):
            return self.bn(self.a(x))

    try:
        @register_block_rule(NormAct)
        def forgetful(block, path):
            return [ConvNode(f"{path}.a", f"{path}.bn")]

        model = timm.create_model("resnet18", num_classes=4)
        model.layer1[0] = NormAct(64)
        with pytest.raises(lf.UnsupportedModelError, match=r"layer1.0.bn is a BatchNormAct2d, which also applies "
                                                            r"layer1.0.bn.act"):
            lf.prepare_model(model)
    finally:
        BLOCK_RULES.pop(NormAct, None)


def test_supported_types_are_listed_before_any_model_is_seen():
    """The built-in rules register on first use: listing them must not depend on a graph having been built."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from hf_layerfold.graph import supported_block_types, supported_model_types; "
            "print(len(supported_block_types()), len(supported_model_types()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert int(out[0]) >= 6 and int(out[1]) >= 3  # InvertedResidual, Bottleneck, ...; EfficientNet, ResNet, ...


def test_config_takes_numpy_numbers_and_names_a_bad_pattern():
    np = pytest.importorskip("numpy")
    config = lf.LayerFoldingConfig(lambda_reg=np.float32(0.5), max_kernel_size=np.int64(5),
                                   regularizer_weights={"bn1.act": np.float32(2)})
    assert json.loads(config.to_json_string())["max_kernel_size"] == 5  # plain numbers again
    assert type(config.lambda_reg) is float and type(config.regularizer_weights["bn1.act"]) is float
    with pytest.raises(ValueError, match=r"exclude_modules=.*the pattern 're:\(' is not a valid regular expression"):
        lf.LayerFoldingConfig(exclude_modules=["re:("])
    with pytest.raises(ValueError, match="a mapping of its fields, got NoneType"):
        lf.LayerFoldingConfig.from_dict(None)
    model = lf.prepare_model(small(), {"lambda_reg": 0.1})  # a dict of fields, as the trainer takes it
    assert model.layerfold_config.lambda_reg == 0.1


def test_torchscript_is_refused_by_name():
    folded = lf.fold_model(lf.prepare_model(small()))
    with pytest.raises(RuntimeError, match="cannot be compiled with torch.jit.script; use torch.export.export or "):
        torch.jit.script(folded)
