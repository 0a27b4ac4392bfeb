"""Latency-aware search: measured fold gains → per-site regularizer weights → the trainer's loss."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import timm
import torch

import hf_layerfold as lf
from hf_layerfold.gains import FoldGains, alpha_groups, measure_fold_gains
from hf_layerfold.losses import alpha_regularizer
from hf_layerfold.prepare import site_regularizer_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_config_round_trips_and_validates_regularizer_weights(tmp_path):
    config = lf.LayerFoldingConfig(regularizer_weights={"blocks.1.*": 2.0, "bn1.act": 0})
    config.save_pretrained(tmp_path)
    assert lf.LayerFoldingConfig.from_pretrained(tmp_path) == config
    for bad, why in (([1.0], "must map"), ({"a": -1.0}, "'a' must be a finite"), ({"a": "x"}, "'a' must be"),
                     ({"a": float("inf")}, "finite"), ({"a": True}, "'a' must be")):
        with pytest.raises(ValueError, match=f"regularizer_weights=.*{why}"):
            lf.LayerFoldingConfig(regularizer_weights=bad)


def test_weights_given_as_text_are_json_or_a_json_file(tmp_path):
    """Command-line parsers (HfArgumentParser in examples/fold_imagenet.py, the CLI) hand the field over as text."""
    from transformers import HfArgumentParser

    assert lf.LayerFoldingConfig(regularizer_weights='{"a": 2}').regularizer_weights == {"a": 2}
    written = tmp_path / "gains.json"  # what `hf-layerfold gains --output` writes: a whole config
    written.write_text(json.dumps({"alpha_sharing": "block", "regularizer_weights": {"blocks.1.*": 1.5}}))
    (config,) = HfArgumentParser(lf.LayerFoldingConfig).parse_args_into_dataclasses(
        ["--regularizer_weights", str(written), "--lambda_reg", "0.02"])
    assert config.regularizer_weights == {"blocks.1.*": 1.5} and config.lambda_reg == 0.02
    with pytest.raises(ValueError, match="regularizer_weights=.*not a JSON object nor a JSON file"):
        lf.LayerFoldingConfig(regularizer_weights=str(tmp_path / "missing.json"))
    measured = _gains({"a": 1.0}, {"a": 2}).save(tmp_path / "measured" / "gains.json")  # a measurement, not weights
    with pytest.raises(ValueError, match="holds a fold-gains measurement, not weights: use FoldGains"):
        lf.LayerFoldingConfig(regularizer_weights=str(measured))
    with pytest.raises(ValueError, match="fold-gains measurement .*not merge costs: measure those"):
        lf.LayerFoldingConfig(merge_costs=str(measured))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must map site names"):
        lf.LayerFoldingConfig(regularizer_weights=str(tmp_path / "list.json"))
    run_config = lf.LayerFoldingConfig(lambda_reg=0.1).save_pretrained(tmp_path / "run")  # a run without weights
    with pytest.raises(ValueError, match="holds a config whose regularizer_weights is null"):  # not "uniform"
        lf.LayerFoldingConfig(regularizer_weights=str(run_config))


def test_weighted_regularizer_matches_its_definition():
    alphas = [torch.tensor(a, requires_grad=True) for a in (0.0, 0.5, 0.9)]  # α are float32 parameters
    w = [2.0, 0.0, 0.5]
    for kind, per_site in (("paper", lambda a: abs(1 - a * a)), ("l1", lambda a: 1 - a)):
        got = alpha_regularizer(alphas, kind, w)
        expected = sum(wi * per_site(float(a.detach())) for wi, a in zip(w, alphas))
        assert float(got.detach()) == pytest.approx(expected, rel=1e-6)
    got.backward()  # l1: dR/dα = -w
    assert [float(a.grad) for a in alphas] == pytest.approx([-2.0, 0.0, -0.5])
    unit = alpha_regularizer(alphas, "l1", [1.0] * 3).detach()
    assert float(unit) == pytest.approx(float(alpha_regularizer(alphas, "l1").detach()))
    with pytest.raises(ValueError, match="2 regularizer weights for 3 sites"):
        alpha_regularizer(alphas, "l1", [1.0, 1.0])


def test_site_weights_exact_name_then_first_pattern_then_one():
    sites = ["bn1.act", "blocks.1.0.bn1.act", "blocks.1.0.bn2.act", "blocks.2.0.bn1.act"]
    weights = {"blocks.1.0.bn2.act": 5.0, "blocks.1.*": 2.0, "re:blocks\\.1\\..*": 9.0}
    assert site_regularizer_weights(sites, weights) == [1.0, 2.0, 5.0, 1.0]
    assert site_regularizer_weights(sites, {"blocks.2.0": 3}) == [1.0, 1.0, 1.0, 3.0]  # a block prefix
    assert site_regularizer_weights(sites, None) is None
    with pytest.raises(ValueError, match=r"\['blocks.9.\*'\] match no foldable site.*bn1.act"):
        site_regularizer_weights(sites, {"blocks.9.*": 1.0})


def _gains(saved: dict[str, float], sizes: dict[str, int], baseline: float = 10.0) -> FoldGains:
    groups = {o: {"sites": [f"{o}.s{i}" for i in range(sizes[o])], "ms": baseline - s} for o, s in saved.items()}
    return FoldGains("cpu", 1, (3, 32, 32), "fp32", False, baseline, groups)


def test_weights_follow_the_saving_split_over_a_group_with_mean_one():
    gains = _gains({"a": 2.0, "b": 1.0, "c": -0.5, "d": 0.04}, {"a": 2, "b": 1, "c": 2, "d": 1})
    w = gains.weights()
    assert sum(w.values()) / len(w) == pytest.approx(1.0)
    assert w["a.s0"] == w["a.s1"] == pytest.approx(w["b.s0"])  # twice the saving over twice the sites
    assert w["c.s0"] == w["c.s1"] == 0.0  # folding it makes the model slower: no push
    assert w["a.s0"] + w["a.s1"] == pytest.approx(2 * w["b.s0"])
    assert gains.weights(min_saving=0.005)["d.s0"] == 0.0 and w["d.s0"] > 0  # 0.04 ms < 0.5 % of 10 ms
    with pytest.raises(ValueError, match="folding no α group alone saves"):
        _gains({"a": -1.0}, {"a": 2}).weights()
    assert FoldGains.from_dict(json.loads(json.dumps(gains.to_dict()))) == gains
    assert FoldGains.from_dict({**gains.to_dict(), "weights": w, "saved_ms": {}}) == gains  # a sweep's fold_gains


def test_estimated_speedup_adds_the_savings_of_the_groups_a_plan_folds_whole():
    gains = _gains({"a": 2.0, "b": 3.0, "c": -1.0}, {"a": 2, "b": 1, "c": 1})
    assert gains.estimated_speedup([]) == 1.0
    assert gains.estimated_speedup(["a.s0", "a.s1"]) == pytest.approx(10 / 8)
    assert gains.estimated_speedup(lf.FoldPlan(("a.s0", "a.s1"))) == pytest.approx(10 / 8)  # a plan as it is
    assert gains.estimated_speedup(["a.s0", "a.s1", "b.s0", "c.s0"]) == pytest.approx(10 / 6)
    with pytest.raises(ValueError, match=r"part of an α group each.*'given': \['a.s1'\], 'group': \['a.s0', 'a.s1'\]"):
        gains.estimated_speedup(["a.s1", "b.s0"])  # a fused block: the group's saving is not this plan's
    with pytest.raises(ValueError, match=r"sites not in this measurement: \['z'\]"):
        gains.estimated_speedup(["z"])
    with pytest.raises(ValueError, match="save 12.000 ms of a 10.000 ms baseline"):
        _gains({"a": 6.0, "b": 6.0}, {"a": 1, "b": 1}).estimated_speedup(["a.s0", "b.s0"])
    with pytest.raises(TypeError, match="got the string 'a.s0'"):  # (it was read as the characters a . s 0)
        gains.estimated_speedup("a.s0")


def test_a_hand_edited_measurement_is_refused_when_read(tmp_path):
    """Fields of the wrong type loaded, then failed in weights() with a TypeError or AttributeError."""
    good = _gains({"a": 2.0}, {"a": 1}).to_dict()
    for bad, said in (({"groups": [1, 2]}, "groups=[1, 2]"), ({"baseline_ms": "fast"}, "baseline_ms='fast'"),
                      ({"baseline_ms": float("nan")}, "baseline_ms=nan"),
                      ({"groups": {"a": {"sites": ["a.s0"], "ms": -1}}}, "groups['a']")):
        (tmp_path / "g.json").write_text(json.dumps({**good, **bad}))
        with pytest.raises(ValueError, match=f"not a readable fold-gains measurement: {re.escape(said)}"):
            FoldGains.load(tmp_path / "g.json")


def test_measure_fold_gains_times_every_group_of_a_real_model(tmp_path):
    model = timm.create_model("mobilenetv2_050", num_classes=10)
    with pytest.raises(ValueError, match="needs a prepared model"):
        measure_fold_gains(model)
    lf.prepare_model(model, lf.LayerFoldingConfig(alpha_sharing="block"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gains = measure_fold_gains(model, (3, 32, 32), rounds=2, round_seconds=0.005, warmup=1)
    groups = alpha_groups(model)
    assert list(gains.groups) == list(groups) and len(groups) == 18  # stem, 17 blocks: 34 sites
    assert all(gains.groups[o]["sites"] == sites for o, sites in groups.items())
    assert gains.baseline_ms > 0 and gains.noise_ms >= 0 and all(g["ms"] > 0 for g in gains.groups.values())
    assert gains.model == "mobilenetv2_050" and gains.device == "cpu"  # what was measured, in the file
    assert measure_fold_gains(model, (3, 16, 16), rounds=1, round_seconds=0.001, warmup=0, device="auto").device \
        == ("cuda" if torch.cuda.is_available() else "cpu")  # the device timed, not "auto"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    gains.save(tmp_path / "g.json")
    assert FoldGains.from_dict(json.loads((tmp_path / "g.json").read_text())) == gains
    lf.apply_plan(model, lf.FoldPlan())
    with pytest.raises(ValueError, match="plan is not fixed yet"):
        measure_fold_gains(model)


def test_measure_plan_speedup_times_a_plan_before_any_training():
    model = lf.prepare_model(timm.create_model("mobilenetv2_050", num_classes=10), lf.LayerFoldingConfig())
    plan = lf.FoldPlan.from_blocks(model, ["blocks.1.1", "blocks.2.0.bn1.act"])  # a block and a fused block
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quick = dict(rounds=3, round_seconds=0.005, warmup=1)
    timed = lf.measure_plan_speedup(model, plan, 32, **quick)
    assert set(timed) == {"baseline_ms", "plan_ms", "speedup"} and all(v > 0 for v in timed.values())
    assert timed["plan_ms"] == pytest.approx(timed["baseline_ms"] / timed["speedup"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    with pytest.raises(ValueError, match="not foldable in this model"):
        lf.measure_plan_speedup(model, lf.FoldPlan(["blocks.1.1.nope"]), 32, **quick)
    by_names = lf.measure_plan_speedup(model, list(plan.linear_sites), 32, **quick)  # names, as elsewhere
    assert by_names["speedup"] > 0
    with pytest.raises(ValueError, match="measure_plan_speedup: rounds must be a positive integer"):
        lf.measure_plan_speedup(model, plan, 32, **{**quick, "rounds": 0})
    lf.apply_plan(model, plan)
    with pytest.raises(ValueError, match="plan is not fixed yet"):
        lf.measure_plan_speedup(model, plan, 32, **quick)


def test_timing_takes_the_input_sizes_fold_stats_takes_and_names_bad_arguments(tmp_path):
    model = lf.prepare_model(timm.create_model("test_efficientnet", num_classes=10),
                             lf.LayerFoldingConfig(blend="eager"))
    quick = dict(rounds=1, round_seconds=0.001, warmup=0)
    for size in (24, (24, 24)):  # an int side or (height, width), as fold_stats: not a 1-channel or a crash
        assert measure_fold_gains(model, size, **quick).input_size == (3, 24, 24)
        assert "conv_stem" in lf.measure_merge_costs(model, size, **quick)
    for measure in (measure_fold_gains, lf.measure_merge_costs):
        for bad, why in (({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
                         ({"rounds": 0}, "rounds must be a positive integer"),
                         ({"dtype": "float32"}, "dtype 'float32' is not supported; supported: fp32, bf16, fp16"),
                         ({"input_size": (1, 3, 24, 24)}, r"input_size must be \(channels, height, width\)"),
                         ({"input_size": (3, 0, 24)}, "input_size must be"),
                         ({"warmup": 1.5}, "warmup must be a whole number of passes >= 0, got 1.5"),
                         ({"warmup": -1}, "warmup must be"),
                         ({"round_seconds": float("nan")}, "round_seconds must be a finite number > 0, got nan")):
            with pytest.raises(ValueError, match=f"{measure.__name__}: {why}"):
                measure(model, **{"input_size": (3, 24, 24), **quick, **bad})
    assert "conv_stem" in lf.measure_merge_costs(model, 24, batch_size=np.int64(2), **quick)  # numpy ints are ints
    gray = lf.prepare_model(timm.create_model("test_efficientnet", num_classes=10, in_chans=1),
                            lf.LayerFoldingConfig(blend="eager"))
    for measure in (measure_fold_gains, lf.measure_merge_costs):  # (timm keeps (3, H, W) in its pretrained_cfg)
        with pytest.raises(ValueError, match=rf"{measure.__name__}: input_size \(3, 24, 24\) has 3 channel\(s\) "
                                             "but the model takes 1"):  # (was a conv's RuntimeError, mid-timing)
            measure(gray, (3, 24, 24), **quick)
    lf.LayerFoldingConfig().save_pretrained(tmp_path)  # a config is not a measurement
    with pytest.raises(ValueError, match=r"layerfold_config.json: not a fold-gains measurement .*lacks \['device'"):
        FoldGains.load(tmp_path / "layerfold_config.json")
    wrong = FoldGains("cpu", 1, (3, 8, 8), "fp32", False, 1.0, {}).to_dict() | {"input_size": 5}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="wrong.json: not a readable fold-gains measurement"):
        FoldGains.load(tmp_path / "wrong.json")
