"""Measured merge costs: the table, the split it picks, and that any such split still folds exactly."""

import json

import pytest
import timm
import torch
from conftest import randomize_bn, rel_err

import hf_layerfold as lf
from hf_layerfold.merge_costs import mergeable_spans
from hf_layerfold.plan import span_key


def _prepared(**config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobilenetv2_050", num_classes=10)).double().eval()
    return lf.prepare_model(model, lf.LayerFoldingConfig(**config))


def _table(model, cost) -> dict[str, float]:
    """A cost for every span a plan could merge: ``cost(span)`` with span a list of conv names."""
    return {span_key(s[0].conv, s[-1].conv): cost([c.conv for c in s]) for s in mergeable_spans(model)}


def _fold_all_linear(model):
    planned = lf.apply_plan(model, lf.FoldPlan(tuple(lf.foldable_sites(model))))
    return planned, lf.fold_model(planned)


def _assert_exact(planned, folded):
    for size in (32, 29):  # even and odd: border handling differs
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        with torch.no_grad():
            assert rel_err(planned(x), folded(x)) < 1e-10


def test_the_split_follows_the_costs_and_stays_exact():
    convs = len([m for m in _prepared().modules() if isinstance(m, torch.nn.Conv2d)])
    base = _prepared()
    never = _table(base, lambda names: 1.0 if len(names) == 1 else 10.0)  # every merge loses: nothing merges
    planned, folded = _fold_all_linear(_prepared(merge_costs=never))
    assert lf.fold_stats(folded, 32).depth == convs
    _assert_exact(planned, folded)

    always = _table(base, lambda names: 1.0 if len(names) == 1 else 0.1)  # every merge wins: as far as allowed
    planned, folded = _fold_all_linear(_prepared(merge_costs=always))
    greedy_planned, greedy = _fold_all_linear(_prepared())
    assert lf.fold_stats(folded, 32).depth == lf.fold_stats(greedy, 32).depth < convs
    _assert_exact(planned, folded)

    # a split no other policy makes: in every expand -> depthwise -> project chain, merge expand and depthwise only
    def pw_dw(names):
        if len(names) == 1:
            return 1.0
        return 0.1 if len(names) == 2 and names[0].endswith("conv_pw") and names[1].endswith("conv_dw") else 10.0
    odd = _table(base, pw_dw)
    planned, folded = _fold_all_linear(_prepared(merge_costs=odd))
    chains = sum(1 for key in odd if key.endswith("conv_dw") and key.count(">") == 1 and "conv_pw>" in key)
    assert chains > 5 and lf.fold_stats(folded, 32).depth == convs - chains
    _assert_exact(planned, folded)


def test_measured_costs_cover_every_conv_and_round_trip(tmp_path):
    model = _prepared(alpha_sharing="block")
    costs = lf.measure_merge_costs(model, (3, 32, 32), rounds=1, round_seconds=0.001, warmup=1)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert names <= set(costs) and len(costs) > len(names)  # every conv, and the merges
    assert all(0 < v < 1e3 for v in costs.values())
    config = lf.LayerFoldingConfig(alpha_sharing="block", merge_costs=costs)
    assert lf.LayerFoldingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    (tmp_path / "costs.json").write_text(json.dumps({"merge_costs": costs}))  # a saved config holding them
    assert lf.LayerFoldingConfig(merge_costs=str(tmp_path / "costs.json")).merge_costs == costs
    assert lf.LayerFoldingConfig(merge_costs=tmp_path / "costs.json").merge_costs == costs  # a Path, as a str
    planned, folded = _fold_all_linear(_prepared(alpha_sharing="block", merge_costs=costs))
    _assert_exact(planned, folded)
    save = lf.save_folded(planned, tmp_path / "save")  # the card names the table; config.json keeps it whole
    assert f"{len(costs)} measured conv / merge latencies" in (save / "README.md").read_text()
    assert json.loads((save / "config.json").read_text())["model_args"]["layerfold"]["config"]["merge_costs"] == costs


def test_bad_tables_and_models_are_refused():
    with pytest.raises(ValueError, match="merge_costs=.*must be a finite number >= 0"):
        lf.LayerFoldingConfig(merge_costs={"conv_stem": -1.0})
    with pytest.raises(ValueError, match="merge_costs=.*not a JSON object nor a JSON file"):
        lf.LayerFoldingConfig(merge_costs="missing-costs.json")
    # measured for another model: refused when the model is prepared, not when the plan is fixed after the search
    model = randomize_bn(timm.create_model("mobilenetv2_050", num_classes=10)).double().eval()
    with pytest.raises(ValueError, match=r"merge_costs lacks \d+ of the convs and merges .*measure_merge_costs"):
        lf.prepare_model(model, lf.LayerFoldingConfig(merge_costs={"conv_stem": 1.0}))
    assert not any(isinstance(m, lf.FoldableActivation) for m in model.modules())  # refused before any change
    assert not hasattr(model, "layerfold_config")
    lf.prepare_model(model, lf.LayerFoldingConfig())  # so a retry works
    # measured for another config (fewer sites): the merges it lacks were silently never made
    partial = lf.measure_merge_costs(_prepared(target_modules=["blocks.1.*"]), (3, 32, 32), rounds=1,
                                     round_seconds=0.001, warmup=0)
    with pytest.raises(ValueError, match="measured for another model or config"):
        _prepared(merge_costs=partial)
    with pytest.raises(ValueError, match="measured for another model or config"):  # the config apply_plan is given
        lf.apply_plan(_prepared(), lf.FoldPlan(), lf.LayerFoldingConfig(merge_costs=partial))
    gains_config = json.dumps({"lambda_reg": 0.1, "merge_costs": None})  # gains --output without merge costs
    with pytest.raises(ValueError, match="holds a config whose merge_costs is null"):
        lf.LayerFoldingConfig(merge_costs=gains_config)
    with pytest.raises(ValueError, match="needs a prepared model"):
        lf.measure_merge_costs(timm.create_model("mobilenetv2_050"), (3, 32, 32))
    planned = lf.apply_plan(_prepared(), lf.FoldPlan())
    with pytest.raises(ValueError, match="plan is not fixed yet"):
        lf.measure_merge_costs(planned, (3, 32, 32))
