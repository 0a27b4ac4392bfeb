"""Smoke test of the benchmark runner: quick mode on a tiny timm model writes real JSON, markdown and plots."""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package
from benchmarks import report, report_plans, report_sweeps  # noqa: E402


def _finite_positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """The runner as a user runs it, in its own process (benchmarks change torch's global settings)."""
    out = tmp_path_factory.mktemp("bench")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "exactness,latency,fold_time",
         "--results-dir", str(out), "--models", "test_efficientnet", "--archs", "test_efficientnet",
         "--input-size", "32"],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = dict(re.findall(r"^\[run\] (\w+): (\S+)$", proc.stderr, flags=re.M))
    return out, status


def test_runner_writes_one_json_per_benchmark_with_device(quick_results):
    out, status = quick_results
    assert status["exactness"] == status["latency"] == status["fold_time"] == "ok"
    for name in ("exactness", "latency_cpu", "fold_time"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data["device"]["cpu"] and data["device"]["torch"]  # every result names its device
        assert data["quick"] is True


def test_exactness_numbers_are_real(quick_results):
    out, _ = quick_results
    arch = json.loads((out / "exactness.json").read_text())["archs"][0]
    assert arch["supported"] and arch["foldable_sites"] > 0
    fp64 = [r["rel_err"] for r in arch["rows"] if r["dtype"] == "float64"]
    assert len(fp64) == 6 and all(0 <= e < 1e-10 for e in fp64)  # 3 plans x 2 sizes, folding is exact
    assert {r["size"] for r in arch["rows"]} == {64, 37}  # one odd size


def test_latency_cells_compare_folded_with_hand_built(quick_results):
    out, _ = quick_results
    data = json.loads((out / "latency_cpu.json").read_text())
    assert [c["threads"] for c in data["cells"]] == [1]  # quick mode: one thread (full runs add 2 threads)
    cell = data["cells"][0]
    assert {"bn_fused", "all"} <= set(cell["plans"])
    for plan in cell["plans"].values():
        assert _finite_positive(plan["folded_ms"]) and _finite_positive(plan["hand_ms"])
        assert _finite_positive(plan["folded_over_hand"]) and _finite_positive(plan["speedup_vs_bn_fused"])
        assert plan["meets_1_03"] == (plan["folded_over_hand"] <= 1.03)  # the paired ratio decides
    assert _finite_positive(cell["aa_control"]["paired"])
    assert cell["plans"]["all"]["convs"] < cell["plans"]["bn_fused"]["convs"]


def test_fold_time_and_markdown(quick_results):
    out, status = quick_results
    rows = json.loads((out / "fold_time.json").read_text())["rows"]
    assert rows and all(_finite_positive(r["median_s"]) for r in rows)
    md = (out / "RESULTS.md").read_text()
    assert status["report"] == str(out / "RESULTS.md")
    for heading in ("Exactness", "Latency", "Fold time"):
        assert f"## {heading}" in md
    assert md.count("Device: CPU") >= 3 and "test_efficientnet" in md
    assert (out / "latency_cpu.png").stat().st_size > 1000


def test_accuracy_sweep_quick_run_and_report(tmp_path):
    """The real sweep (LayerFoldingTrainer on Fashion-MNIST, tiny) writes its JSON; the report turns it into a table,
    a plot and the README's generated results block."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "accuracy_sweep.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_accuracy_sweep", "--quick", "--lambdas", "0.5",
                           "--start", "baseline", "--continue-steps", "10", "--distill-weight", "0.5",
                           "--folded-steps", "2", "--latency-weights", "cpu:1:64", "--plan",
                           "p1=bn1,blocks.0.0,blocks.1.0.bn1.act", "--merge-costs", "cpu:1:64", "--teacher", "control",
                           "--out", str(out)], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["run"] for r in data["rows"]] == ["lambda=0", "lambda=0 continued", "lambda=0.5", "plan=p1"]
    base, control, folded, fixed = data["rows"]
    assert fixed["fixed_plan"] == ["bn1", "blocks.0.0", "blocks.1.0.bn1.act"] and fixed["steps"] == 10  # no search
    assert sorted(data["linear_sites"]["plan=p1"]) == ["blocks.0.0.bn1.act", "blocks.1.0.bn1.act", "bn1.act"]
    assert "one α per site" in data["caveats"]  # a fixed plan may name single sites, whatever the sharing
    assert fixed["top1_gap_vs_control_points"] == round(control["top1_pct"] - fixed["top1_pct"], 2)
    assert control["control"] and not folded["control"] and data["settings"]["start"] == "baseline"
    assert folded["top1_gap_vs_control_points"] == round(control["top1_pct"] - folded["top1_pct"], 2)
    assert (base["steps"], control["steps"], folded["steps"]) == (8, 10, 10)  # --continue-steps after the baseline
    assert "teacher" not in base and control["teacher"] == "lambda=0"  # --teacher control: the control distills
    assert folded["teacher"] == fixed["teacher"] == "lambda=0 continued"  # from λ = 0, the folding runs from it
    assert "folded_steps" not in base and control["folded_steps"] == folded["folded_steps"] == 2  # then the nets
    assert all(0 <= r["top1_before_folded_pct"] <= 100 for r in (control, folded))
    gains = data["fold_gains"]  # latency-aware: every site's weight from the measured saving of its block
    assert data["settings"]["latency_weights"] == "cpu:1:64" and gains["input_size"] == [3, 64, 64]
    assert data["settings"]["merge_costs"] == "cpu:1:64" and "conv_stem" in data["merge_costs"]  # every run split
    assert all(0 < v for v in data["merge_costs"].values())  # by the table measured before training
    assert len(gains["weights"]) == folded["sites"] == 32 and sum(gains["weights"].values()) == pytest.approx(32)
    for row in data["rows"]:
        assert 0 <= row["top1_pct"] <= 100 and row["folded_vs_planned_max_abs_diff"] < 1e-3
        assert set(row["speedup"]) == {"cpu b1 224 float32", "cpu b1 32 float32"}
        assert all(_finite_positive(v) for v in row["speedup"].values())
    assert base["speedup"]["cpu b1 224 float32"] == 1.0  # the baseline against itself
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nstale\n<!-- results:end -->\noutro\n")
    md = report.build_report(tmp_path, readme=readme).read_text()
    assert "## Accuracy against depth" in md and "| lambda=0.5 |" in md and "loss vs control" in md
    assert "| plan=p1 |" in md
    assert "Latency-aware regularizer weights, measured on cpu b1 64x64 fp32" in md
    assert (tmp_path / "accuracy_sweep.png").stat().st_size > 1000
    text = readme.read_text()
    assert "stale" not in text and "Accuracy vs depth, CPU proxy (1 sweep, CPU" in text  # a CPU sweep: a proxy
    assert "| `accuracy_sweep.json` | 0 | 256/200 | site |" in md  # its row in the at-a-glance table
    assert text.startswith("intro\n") and text.endswith("outro\n")


def test_a_sweep_from_the_imagenet_weights_with_a_teacher_has_a_distilled_control(tmp_path):
    """From the ImageNet weights, a folding run that distills from the λ = 0 model is judged against λ = 0 trained
    with that same teacher, so the teacher alone never counts as accuracy kept."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "accuracy_sweep.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_accuracy_sweep", "--quick", "--lambdas", "",
                           "--distill-weight", "0.5", "--plan", "p1=blocks.1.1", "--latency-sizes", "train",
                           "--out", str(out)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["run"] for r in data["rows"]] == ["lambda=0", "plan=p1", "lambda=0 distilled"]
    base, fixed, control = data["rows"]
    assert control["control"] and control["teacher"] == fixed["teacher"] == "lambda=0" and "teacher" not in base
    assert control["steps"] == fixed["steps"] == base["steps"] and "lambda=0 distilled" in data["description"]
    assert fixed["top1_gap_vs_control_points"] == round(control["top1_pct"] - fixed["top1_pct"], 2)
    assert fixed["control_run"] == "lambda=0 distilled"
    assert "against the distilled λ = 0 control" in report_sweeps._vs_control(fixed)


def test_a_cached_baseline_gives_the_same_sweep_without_training_it_again(tmp_path):
    """``--baseline-cache``: the first sweep stores its λ = 0 run, the second reuses it (the plans then train exactly as
    they did beside the trained one), and a sweep with other baseline settings is refused rather than misled. With
    it, ``--control-from`` and ``--control-first``: a control taken over or trained right after λ = 0."""
    root = Path(__file__).resolve().parent.parent
    cache = tmp_path / "baseline.pt"

    def sweep(name: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "benchmarks.bench_accuracy_sweep", "--quick", "--lambdas", "",
                               "--start", "baseline", "--continue-steps", "10", "--distill-weight", "0.5", "--plan",
                               "p1=blocks.1.1", "--latency-sizes", "train", "--baseline-cache", str(cache),
                               "--out", str(tmp_path / name), *extra], cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600)

    first, again = sweep("first.json"), sweep("again.json")
    assert first.returncode == 0 and again.returncode == 0, (first.stderr + again.stderr)[-2000:]
    assert "reused from" in again.stderr and "reused from" not in first.stderr
    runs = [json.loads((tmp_path / name).read_text())["rows"] for name in ("first.json", "again.json")]
    assert [r["run"] for r in runs[1]] == ["lambda=0", "plan=p1", "lambda=0 continued"]
    assert runs[1][0]["cached_from"] == "baseline.pt" and "cached_from" not in runs[0][0]
    for before, after in zip(*runs, strict=True):
        assert (before["top1_pct"], before["top5_pct"]) == (after["top1_pct"], after["top5_pct"]), after["run"]
    other = sweep("other.json", "--seed", "1")
    assert other.returncode != 0 and "other settings" in other.stderr and "'seed': (0, 1)" in other.stderr
    # --control-from: a third sweep takes the control from the first one's JSON instead of training it
    third = sweep("third.json", "--control-from", str(tmp_path / "first.json"))
    assert third.returncode == 0, third.stderr[-2000:]
    rows = json.loads((tmp_path / "third.json").read_text())["rows"]
    # recorded with the λ = 0 run (it costs no time), so a sweep cut short still has its gaps to the control
    assert [r["run"] for r in rows] == ["lambda=0", "lambda=0 continued", "plan=p1"]
    assert rows[1]["reused_from"] == "first.json" and rows[1]["top1_pct"] == runs[0][2]["top1_pct"]
    assert "speedup" not in rows[1] and rows[2]["control_run"] == "lambda=0 continued"
    assert rows[2]["top1_gap_vs_control_points"] == round(rows[1]["top1_pct"] - rows[2]["top1_pct"], 2)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "accuracy_sweep_third.json").write_text((tmp_path / "third.json").read_text())
    md = report.build_report(tmp_path / "report", readme=None).read_text()  # the report says where they came from
    assert "lambda=0 from `baseline.pt`; lambda=0 continued from `first.json`" in md
    # a λ = 0 run that does not match the other sweep's (another GPU's numerics, say): the control trains here
    doctored = json.loads((tmp_path / "first.json").read_text())
    doctored["rows"][0]["top1_pct"] += 1.0
    (tmp_path / "doctored.json").write_text(json.dumps(doctored))
    fourth = sweep("fourth.json", "--control-from", str(tmp_path / "doctored.json"))
    assert fourth.returncode == 0, fourth.stderr[-2000:]
    data = json.loads((tmp_path / "fourth.json").read_text())
    assert "differs from this one's" in data["control_not_reused"] and "it trains here instead" in fourth.stderr
    # it was asked for, so it trains next: a deadline then cuts a folding run, not every folding run's gap to it
    assert [r["run"] for r in data["rows"]] == ["lambda=0", "lambda=0 continued", "plan=p1"]
    control = data["rows"][1]
    assert "reused_from" not in control and control["top1_pct"] == runs[0][2]["top1_pct"] and "speedup" in control
    assert data["rows"][2]["top1_pct"] == runs[0][1]["top1_pct"]  # the order changes no run
    assert "it was trained here after all" in "\n".join(report_sweeps.accuracy_sweep_section(data, None))
    noted = {**data, "note": "what this sweep tried differently"}  # a hand-written note is shown, not dropped
    assert "what this sweep tried differently" in "\n".join(report_sweeps.accuracy_sweep_section(noted, None))
    cut = {**data, "rows": data["rows"][::2], "skipped": ["lambda=0 continued"]}  # a deadline dropped it instead
    assert "it was then skipped by `--deadline-s`" in "\n".join(report_sweeps.accuracy_sweep_section(cut, None))
    # --control-first: a control of its own (a GPU call on another seed) trains next too, for the same reason
    fifth = sweep("fifth.json", "--control-first")
    assert fifth.returncode == 0, fifth.stderr[-2000:]
    rows = json.loads((tmp_path / "fifth.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["lambda=0", "lambda=0 continued", "plan=p1"]
    assert [r["top1_pct"] for r in rows] == [runs[0][i]["top1_pct"] for i in (0, 2, 1)]  # the same runs
    longer = sweep("longer.json", "--control-from", str(tmp_path / "first.json"), "--continue-steps", "12")
    assert longer.returncode != 0 and "'continue_steps': (10, 12)" in longer.stderr  # refused before training
    assert "training" not in longer.stderr and not (tmp_path / "longer.json").exists()


@pytest.mark.parametrize("spec", ["nameless", "p=", "p=blocks.99"])
def test_accuracy_sweep_refuses_a_bad_plan_before_training(spec, capsys):
    from benchmarks import bench_accuracy_sweep

    with pytest.raises(SystemExit) as exit_info:
        bench_accuracy_sweep.main(["--quick", "--plan", spec, "--out", "/nonexistent/never_written.json"])
    assert exit_info.value.code == 2 and f"--plan {spec!r}" in capsys.readouterr().err


def test_plan_ramp_eases_the_plan_sites_in_and_leaves_the_others_nonlinear():
    import timm
    from transformers import TrainerControl, TrainerState, TrainingArguments

    import hf_layerfold as lf
    from benchmarks.bench_fashion_mnist_method import AlphaRamp

    model = lf.prepare_model(timm.create_model("test_efficientnet", num_classes=3), lf.LayerFoldingConfig())
    plan = lf.FoldPlan.from_blocks(model, ["blocks.1.0"])
    ramp, state = AlphaRamp(plan.linear_sites, 4), TrainerState()
    sites = {m.site: m for m in model.modules() if isinstance(m, lf.FoldableActivation)}
    assert plan.linear_sites and set(plan.linear_sites) < set(sites)
    for step, want in [(0, 0.25), (2, 0.75), (3, 1.0), (9, 1.0)]:
        state.global_step = step
        ramp.on_step_begin(TrainingArguments("unused", report_to=[]), state, TrainerControl(), model=model)
        for name, m in sites.items():
            assert float(m.alpha.detach()) == (want if name in plan.linear_sites else 0.0), (step, name)


@pytest.mark.parametrize("extra", [["--plan-ramp-steps", "3"], ["--plan", "p=bn1", "--plan-ramp-steps", "8"]])
def test_accuracy_sweep_plan_ramp_needs_a_plan_shorter_than_its_run(extra, capsys):
    from benchmarks import bench_accuracy_sweep

    with pytest.raises(SystemExit) as exit_info:
        bench_accuracy_sweep.main(["--quick", *extra, "--out", "/nonexistent/x.json"])
    assert exit_info.value.code == 2 and "--plan-ramp-steps needs --plan" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--start", "baseline"]])
def test_accuracy_sweep_teacher_control_needs_a_control_and_distillation(extra, capsys):
    from benchmarks import bench_accuracy_sweep

    with pytest.raises(SystemExit) as exit_info:
        bench_accuracy_sweep.main(["--quick", "--teacher", "control", *extra, "--out", "/nonexistent/x.json"])
    assert exit_info.value.code == 2 and "--teacher control needs --start baseline" in capsys.readouterr().err


def test_accuracy_sweep_deadline_skips_runs_that_would_not_fit(tmp_path):
    """A time-boxed GPU call keeps what fits: past ``--deadline-s`` the remaining runs are listed as skipped and the
    JSON (with the baseline's latency) is still written."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_accuracy_sweep", "--quick", "--lambdas", "0.5",
                           "--start", "baseline", "--continue-steps", "10", "--deadline-s", "0.01",
                           "--out", str(out)], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["run"] for r in data["rows"]] == ["lambda=0"]
    assert data["skipped"] == ["lambda=0.5", "lambda=0 continued"]  # the control last: a cut drops it first
    assert data["rows"][0]["speedup"]["cpu b1 224 float32"] == 1.0


def test_accuracy_sweep_reuses_stored_fold_gains(tmp_path):
    """``--latency-weights FILE`` takes an earlier measurement (a sweep's ``fold_gains`` or a FoldGains file) as it
    was stored; a file without one is a one-line error."""
    from benchmarks.bench_accuracy_sweep import measure_gains
    from hf_layerfold.gains import FoldGains

    stored = FoldGains("cpu", 1, (3, 64, 64), "float32", False, 10.0,
                       {"blocks.1.0.bn1.act": {"sites": ["blocks.1.0.bn1.act", "blocks.1.0.bn2.act"], "ms": 8.0}})
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"benchmark": "accuracy_sweep", "fold_gains": {**stored.to_dict(), "weights": {}}}))
    assert measure_gains(None, str(sweep)) == stored
    assert measure_gains(None, str(stored.save(tmp_path / "gains.json"))) == stored
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(SystemExit, match="not a readable fold-gains JSON"):
        measure_gains(None, str(tmp_path / "other.json"))
    with pytest.raises(SystemExit, match="not a readable fold-gains JSON"):
        measure_gains(None, str(tmp_path / "missing.json"))


def test_merge_policy_times_each_plan_three_ways(tmp_path):
    from benchmarks import bench_merge_policy

    plans = tmp_path / "sweep.json"
    plans.write_text(json.dumps({"linear_sites": {"lambda=0": [], "p": ["blocks.1.1.bn1.act", "blocks.1.1.bn2.act",
                                                                         "blocks.5.1.bn1.act", "blocks.5.1.bn2.act"]}}))
    data = bench_merge_policy.main(["--plans-from", str(plans), "--quick", "--out", str(tmp_path / "merge.json")])
    rows = {r["policy"]: r for r in data["rows"]}
    assert [r["plan"] for r in data["rows"]] == ["p"] * 3 and rows.keys() == {"dense", "macs0", "measured"}
    assert rows["dense"]["depth"] < rows["macs0"]["depth"]  # a k5 block merged dense adds MACs: macs0 keeps it
    assert rows["dense"]["mmacs"] > rows["macs0"]["mmacs"]
    assert all(_finite_positive(r["speedup_vs_bn_fused"]) for r in data["rows"])
    assert len(data["merge_costs"]["cpu b1 32 fp32"]) > 50


def test_plan_ablation_times_the_plan_each_block_away_from_it_and_stores_the_fold_gains(tmp_path):
    from benchmarks import bench_plan_ablation
    from hf_layerfold.gains import FoldGains

    gains_path = tmp_path / "gains.json"
    data = bench_plan_ablation.main(["--plan", "p=bn1,blocks.1.1", "--quick", "--out", str(tmp_path / "a.json"),
                                     "--gains-out", str(gains_path)])
    variants = [r["variant"] for r in data["rows"]]
    assert variants[:3] == ["plan", "-bn1", "-blocks.1.1"] and "+blocks.1.1" not in variants
    assert {"+blocks.0.0", "+blocks.1.0", "+blocks.6.0"} <= set(variants) and len(variants) == 3 + 15
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["-blocks.1.1"]["blocks"] == 1 and rows["+blocks.1.0"]["blocks"] == 3
    assert rows["+blocks.1.0"]["depth"] < rows["plan"]["depth"] < rows["-blocks.1.1"]["depth"]
    assert all(_finite_positive(r["speedup_vs_bn_fused"]) for r in data["rows"])
    blocks = "0.0 1.0 1.1 2.0 2.1 3.0 3.1 3.2 4.0 4.1 4.2 5.0 5.1 5.2 5.3 6.0".split()
    assert set(FoldGains.load(gains_path).groups) == {"bn1.act"} | {f"blocks.{b}.bn1.act" for b in blocks}
    bullet = report.summary([(tmp_path / "a.json", data)])[0]
    assert bullet.startswith("- (quick mode: smoke-test numbers) Plan ablation (`a.json`, ")  # (not a result)
    assert f"plan p {report.fmt(rows['plan']['speedup_vs_bn_fused'])}×" in bullet


def test_plan_ablation_sites_adds_each_site_of_the_untouched_blocks_alone():
    import argparse

    from benchmarks.bench_accuracy_sweep import _lite0
    from benchmarks.bench_plan_ablation import variants

    model = _lite0(argparse.Namespace(alpha_sharing="site", max_macs_increase=None))
    plan = ["bn1", "blocks.1.1", "blocks.2.0.bn1.act"]
    found = variants(model, plan, sites=True)
    assert found["-blocks.2.0.bn1.act"] == ["bn1", "blocks.1.1"] and found["+blocks.2.0"] == [*plan, "blocks.2.0"]
    assert found["+blocks.1.0.bn1.act"] == [*plan, "blocks.1.0.bn1.act"] and "+blocks.1.0.bn2.act" in found
    assert not {"+blocks.2.0.bn2.act", "+blocks.1.1.bn1.act", "+blocks.0.0.bn1.act"} & set(found)  # touched, lone
    assert set(found) - set(variants(model, plan)) == {k for k in found if k.startswith("+") and k.count(".") == 4}


def test_profile_step_splits_a_step_into_host_and_op_time(tmp_path):
    from benchmarks import profile_step

    data = profile_step.main(["--model", "mobilenetv2_050", "--batch", "2", "--input-size", "64", "--steps", "2",
                              "--warmup", "1", "--top", "3", "--site-rounds", "2",
                              "--out", str(tmp_path / "profile.json")])
    assert data["site_host_us"].keys() == {"timm_relu6_inplace", "prepared_auto", "prepared_eager",
                                           "triton_route_noop_launch", "triton_route_noop_direct"}
    assert json.loads((tmp_path / "profile.json").read_text())["profiles"].keys() == {"timm", "prepared"}
    for prof in data["profiles"].values():
        assert 0 < prof["host_ms_per_step"] <= prof["wall_ms_per_step"] * 1.05
        assert len(prof["top_host_ops"]) == 3 and all(op["ms_per_step"] > 0 for op in prof["top_host_ops"])


def _sweep(cell: str, seed: int, rows: list[tuple]) -> dict:
    device = {"device": "cuda", "gpu": "Test GPU"} if cell.startswith("cuda") else {"device": "cpu", "cpu": "Test CPU"}
    return {"benchmark": "accuracy_sweep", "device": device, "settings": {"seed": seed},
            "target": {"speedup": 1.6, "max_top1_loss_points": 0.5, "cell": "cuda b128 224 float32"},
            "rows": [{"run": r[0], "lambda_reg": r[1], "top1_pct": r[2], "top1_gap_points": r[3],
                      "top1_gap_vs_control_points": r[4], "control": r[0] == "control", "depth_after": r[5],
                      "steps": 10, "speedup": {cell: r[6]}, "sites_past_threshold": 0, "nonlinear_layers_after": 1,
                      "mmacs_after": 1.0, "meets_target": r[7]} for r in rows]}


def test_report_summary_one_bullet_per_kind_and_a_proxy_table(tmp_path):
    """Sweeps timed at the target's cell get a bullet each; CPU proxies one bullet and one row each in RESULTS.md;
    a training-overhead file one bullet naming the cells over the requirement."""
    cpu, cuda = "cpu b1 224 float32", "cuda b128 224 float32"
    files = {
        "accuracy_sweep_cuda.json": _sweep(cuda, 0, [("lambda=0", 0.0, 90.0, 0.0, None, 49, 1.0, None),
                                                     ("lambda=0.01", 0.01, 89.7, 0.3, None, 30, 1.62, True)]),
        "accuracy_sweep_a.json": _sweep(cpu, 0, [("lambda=0", 0.0, 88.0, 0.0, None, 49, 1.0, None),
                                                 ("control", 0.0, 89.0, -1.0, None, 49, 1.0, None),
                                                 ("lambda=0.02", 0.02, 88.7, -0.7, 0.3, 31, 1.2, None),
                                                 ("lambda=0.04", 0.04, 88.0, 0.0, 1.0, 25, 1.4, None)]),
        "accuracy_sweep_b.json": _sweep(cpu, 1, [("lambda=0", 0.0, 88.0, 0.0, None, 49, 1.0, None),
                                                 ("lambda=0.04", 0.04, 87.0, 1.0, None, 25, 1.4, None)]),
        "train_overhead_cuda.json": {"benchmark": "train_overhead", "required_ratio": 1.05,
                                     "device": {"device": "cuda", "gpu": "Test GPU"},
                                     "rows": [{"model": "m", "batch": 64, "input_size": 224, "ratio_prepared": 1.1,
                                               "ratio_min_prepared": 1.0, "ratio_prepared_eager": 1.2,
                                               "direct_launch": {"forward": 1, "backward": "off"}},
                                              {"model": "m", "batch": 128, "input_size": 224, "ratio_prepared": 0.98,
                                               "ratio_prepared_eager": 1.19}]},
    }
    files["accuracy_sweep_a.json"]["linear_sites"] = {"lambda=0.02": ["x.s0", "x.s1"]}  # all of block x: 10 / 8
    files["accuracy_sweep_b.json"]["linear_sites"] = {"lambda=0.04": ["x.s0"]}  # part of it: no estimate
    files[report_sweeps.TARGET_GAINS] = {"device": "cuda", "batch_size": 128, "input_size": [3, 224, 224],
                                         "dtype": "fp32", "channels_last": False, "baseline_ms": 10.0,
                                         "noise_ms": 0.01, "groups": {"x": {"sites": ["x.s0", "x.s1"], "ms": 8.0}}}
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    md = report.build_report(tmp_path).read_text()
    bullets = md.split("## CPU-proxy sweeps at a glance")[0]
    assert "Accuracy vs depth (`accuracy_sweep_cuda.json`, GPU Test GPU): λ = 0 reaches 90.0 %" in bullets
    assert "λ = 0.01, reaches 89.7 % at depth 30 and 1.62× (cuda b128 224 float32); target ≥ 1.6×" in bullets
    assert "accuracy_sweep_a.json" not in bullets  # proxies: one bullet for all
    assert "CPU proxy (2 sweeps, CPU Test CPU; " in bullets and "1 of 2 sweeps have a folding run within 0.5" in bullets
    assert ("prepared m b64 (partly direct) 1.1×, m b128 0.98×; ≤ 1.05 in 1/2 (other variants: "
            "prepared_eager 1.19–1.2×)") in bullets
    assert "| direct_launch.forward | direct_launch.backward |" in md and "| 1 | off |" in md  # one column per key
    table = md.split("## CPU-proxy sweeps at a glance")[1].split("\n## ")[0]
    assert ("| `accuracy_sweep_a.json` | 0 | all/all | site | pretrained | 10 | 89 | λ = 0.02 | −0.3 | 31 | 1.2 "
            f"| {cpu} | 1.25 |") in table  # estimated at the target's cell from the block's measured saving
    assert ("| `accuracy_sweep_b.json` | 1 | all/all | site | pretrained | 10 | 88 | none (closest: λ = 0.04) | −1 "
            f"| 25 | 1.4 | {cpu} | – |") in table
    assert "accuracy_sweep_cuda.json" not in table


def _plan_sweep(seed, plan_top1: float, control_top1: float | None = 93.0, limit: float = 0.5, **settings) -> dict:
    """A CPU sweep with λ = 0 (92.5 %), its control (unless None) and one fixed plan `p1` (blocks a, b)."""
    plan = {"run": "plan=p1", "lambda_reg": 0.0, "top1_pct": plan_top1, "fixed_plan": ["b", "a"],
            "sites_past_threshold": 4, "depth_after": 40, "top1_gap_points": round(92.5 - plan_top1, 2)}
    rows = [{"run": "lambda=0", "lambda_reg": 0.0, "top1_pct": 92.5, "top1_gap_points": 0.0}, plan]
    if control_top1 is not None:
        plan["top1_gap_vs_control_points"] = round(control_top1 - plan_top1, 2)
        rows.insert(1, {"run": "lambda=0 continued", "lambda_reg": 0.0, "top1_pct": control_top1, "control": True,
                        "top1_gap_points": round(92.5 - control_top1, 2)})
    return {"benchmark": "accuracy_sweep", "device": {"device": "cpu", "cpu": "Test CPU"},
            "settings": {"seed": seed, "steps": 2000, "train_size": 0, **settings},
            "target": {"speedup": 1.6, "max_top1_loss_points": limit, "cell": "cuda b128 224 float32"}, "rows": rows}


def test_report_gathers_each_fixed_plan_over_its_seeds(tmp_path):
    """One row per plan and recipe trained on two seeds or more: each seed's loss against the higher of its λ = 0
    run and its control (marked where it had none), their mean and standard error, the seeds within the limit, and
    the speed-up estimated at the target's cell for the same blocks. A plan seen on one seed, a seed seen twice, a
    sweep without a seed and a quick sweep add nothing; a setting an older sweep did not record reads as its
    default, so it does not split a recipe."""
    estimate = {"benchmark": "plan_estimate", "cell": "cuda b128 224 fp32",
                "rows": [{"plan": "x", "sites": ["a", "b"], "speedup_estimate": 1.7, "speedup_convs_only": 1.3}]}
    files = {"s2.json": _plan_sweep(2, 92.7), "s3.json": _plan_sweep(3, 92.3),  # −0.3, −0.7 against 93.0
             "s3_again.json": _plan_sweep(3, 93.0),  # the same seed again: the first file's run counts
             "s4.json": _plan_sweep(4, 92.9, control_top1=92.4),  # control below λ = 0: judged against λ = 0
             "s5.json": _plan_sweep(5, 92.6, control_top1=None, teacher="baseline"),  # no control; teacher recorded
             "seedless.json": _plan_sweep(None, 80.0),
             "a_quick.json": {**_plan_sweep(6, 80.0, limit=0.1), "quick": True},  # first by name: not the limit
             "short2.json": _plan_sweep(2, 92.0, steps=400), "short3.json": _plan_sweep(3, 92.8, steps=400),
             "other.json": _plan_sweep(2, 90.0, steps=800),  # a recipe with one seed: no row
             "plan_estimate_cuda_b128.json": estimate,
             "plan_estimate_a_cpu.json": {**estimate, "cell": "cpu b1 224 fp32",  # another cell: not used
                                          "rows": [{**estimate["rows"][0], "speedup_estimate": 9.9}]},
             "plan_pick_cuda.json": {"benchmark": "plan_pick", "cell": "cuda b128 224 float32",
                                     "device": {"device": "cuda", "gpu": "NVIDIA Test GPU"},
                                     "rows": [{"plan": "y", "sites": ["b", "a"], "speedup_vs_bn_fused": 1.72}]},
             "plan_pick_a_quick.json": {"benchmark": "plan_pick", "cell": "cuda b128 224 float32", "quick": True,
                                        "rows": [{"plan": "y", "sites": ["a", "b"], "speedup_vs_bn_fused": 9.9}]},
             "plan_pick_a_cpu.json": {"benchmark": "plan_pick", "cell": "cpu b1 224 float32",  # another cell
                                      "rows": [{"plan": "y", "sites": ["a", "b"], "speedup_vs_bn_fused": 8.8}]}}
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    found = report.load_results(tmp_path)
    section = "\n".join(report_plans.plan_seed_section(found))
    # losses 0.3, 0.7, 92.5 − 92.9 = −0.4 and 92.5 − 92.6 = −0.1 (gains): mean 0.125, standard deviation 0.479, ÷ √4
    assert ("| R1 | `p1` | 4 | 40 | 2, 3, 4, 5 | −0.3 / −0.7 / +0.4 / +0.1* | −0.12 | 0.24 | 3 of 4 | 1.7× (1.3×) "
            "| 1.72× (Test GPU) |" in section)  # measured beside the estimate; quick or other-cell timings unused
    assert "| R2 | `p1` | 4 | 40 | 2, 3 | −1 / −0.2 | −0.6 | 0.40 | 1 of 2 | 1.7× (1.3×) |" in section  # fewer runs
    assert "| recipe | steps |" in section and "| R1 | 2000 |" in section and "| R2 | 400 |" in section
    assert "R3" not in section and "800" not in section  # the 800-step recipe has one seed: no row
    one_recipe = [(p, d) for p, d in found if d.get("settings", {}).get("steps") == 2000]
    assert "The recipes differ" not in "\n".join(report_plans.plan_seed_section(one_recipe))
    assert report_plans.plan_seed_bullet(found) == (
        'Fixed plans across seeds (cpu sweeps; RESULTS.md, "Fixed plans across seeds"): 0 of 2 rows (a plan under one '
        "recipe, two seeds or more) lost at most 0.5 point on every seed, against the higher of λ = 0 and the control.")
    held = [(p, d) for p, d in found if p.name in ("s2.json", "s4.json", "plan_estimate_cuda_b128.json")]
    timed = [*held, *[(p, d) for p, d in found if p.name.startswith("plan_pick")]]
    assert report_plans.plan_seed_bullet(timed).endswith(  # a timing, where there is one, comes before the estimate
        "of those timed at the target's cell, the fastest is `p1` (recipe R1): 1.72× (NVIDIA Test GPU, "
        "`plan_pick_cuda.json`); +0.05 point on average over 2 seeds.")
    assert report_plans.plan_seed_bullet(held).endswith(  # −0.3 and +0.4: within 0.5
        "1 of 1 rows (a plan under one recipe, two seeds or more) lost at most 0.5 point on every seed, against the "
        "higher of λ = 0 and the control; of those with an estimate, the one estimated fastest at the target's cell "
        "is `p1` (recipe R1): 1.7× (1.3× counting its fused blocks' convs alone), not timed; +0.05 point on average "
        "over 2 seeds.")
    assert report_plans.plan_seed_bullet(held[:2]).endswith("on every seed, against the higher of λ = 0 and the "
                                                            "control.")  # no estimate file: no estimate named


def test_report_names_a_gpu_sweep_cut_short_and_each_plans_fastest_merge_policy(tmp_path):
    """A time-boxed GPU sweep that kept only λ = 0 and its control said "no folding run stays within 0.5 point",
    as if one had been measured; a merge-policy file had no bullet, though its speed-ups decide which plan to train.
    A control taken over from an earlier sweep is named as such beside the verdict it decides."""
    cuda = "cuda b128 224 float32"
    sweep = _sweep(cuda, 0, [("lambda=0", 0.0, 93.92, 0.0, None, 49, 1.0, False),
                             ("control", 0.0, 94.5, -0.58, None, 49, 1.0, False)])
    sweep["skipped"] = ["plan=p1", "plan=p2"]
    merge = {"benchmark": "merge_policy", "device": {"device": "cuda", "gpu": "Test GPU"},
             "rows": [{"cell": "cuda b128 224 fp32", "plan": p, "policy": pol, "depth": d, "mmacs": 1.0,
                       "median_ms": 1.0, "speedup_vs_bn_fused": v}
                      for p, pol, d, v in [("p1", "dense", 27, 1.624), ("p1", "macs0", 43, 1.264),
                                           ("p2", "dense", 28, 1.528), ("p2", "measured", 29, 1.53)]]
             + [{"cell": "cuda b128 224 bf16 channels_last", "plan": "p2", "policy": "dense", "depth": 28,
                 "mmacs": 1.0, "median_ms": 1.0, "speedup_vs_bn_fused": 9.9}]}
    reused = _sweep(cuda, 0, [("lambda=0", 0.0, 93.92, 0.0, None, 49, 1.0, False),
                              ("control", 0.0, 94.5, -0.58, None, 49, None, None),
                              ("plan=p1", 0.0, 94.31, -0.39, 0.19, 33, 1.693, True)])
    reused["rows"][1]["reused_from"] = "earlier.json"
    reused["rows"][2]["fixed_plan"] = ["a", "b"]
    (tmp_path / "accuracy_sweep_cuda_cut.json").write_text(json.dumps(sweep))
    (tmp_path / "accuracy_sweep_cuda_reused.json").write_text(json.dumps(reused))
    (tmp_path / "merge_policy_cuda.json").write_text(json.dumps(merge))
    bullets = report.summary(report.load_results(tmp_path))
    assert ("- Accuracy vs depth (`accuracy_sweep_cuda_reused.json`, GPU Test GPU): λ = 0 reaches 93.92 % top-1 at "
            "depth 49, its control 94.5 % (taken from `earlier.json`, not trained again); the fastest run within 0.5 "
            "point, plan p1, reaches 94.31 % (−0.19 points against the continued λ = 0 control) at depth 33 and "
            "1.693× (cuda b128 224 float32); target ≥ 1.6× (cuda b128 224 float32): yes.") in bullets
    assert ("- Accuracy vs depth (`accuracy_sweep_cuda_cut.json`, GPU Test GPU): λ = 0 reaches 93.92 % top-1, its "
            "control 94.5 % after 10 more steps; no folding run finished (skipped by `--deadline-s`: plan=p1, "
            "plan=p2).") in bullets
    assert ("- Merge policy (`merge_policy_cuda.json`, GPU Test GPU), fastest policy per plan at cuda b128 224 fp32, "
            "over the BN-fused model: p1 1.624× (dense, depth 27), p2 1.53× (measured, depth 29).") in bullets


def test_gpu_session_trains_both_timed_plans_on_another_seed_in_time(tmp_path, monkeypatch):
    """The prepared GPU call spends its 600 s on issue 5's open doubt: the two plans that met the target on seed 0
    (session 23) trained again on another seed beside that seed's baseline and control, in time. On seed 0 the
    control is taken from session 13's sweep, whose settings must therefore be this sweep's."""
    import torch

    from benchmarks import bench_accuracy_sweep

    monkeypatch.delenv("SEED", raising=False)
    calls = _python_calls(tmp_path, "gpu_session.sh")
    steps = [line.split() for line in calls if line.startswith("-m benchmarks.")]
    assert [s[1] for s in steps] == ["benchmarks.bench_accuracy_sweep"]
    sweep = steps[0]
    plans = [sweep[i + 1] for i, arg in enumerate(sweep) if arg == "--plan"]
    assert [p.split("=")[0] for p in plans] == ["fused_s12_s45", "fused_s123_s45"]
    assert bench_accuracy_sweep.parse_plans(argparse.ArgumentParser(), plans)  # each names real sites
    assert sweep[sweep.index("--seed") + 1] == "1" and "--control-from" not in sweep  # its own control trains,
    assert "--control-first" in sweep  # before the plans: a short deadline cuts a plan, not both plans' reference
    assert sweep[sweep.index("--steps") + 1] == "1200" and sweep[sweep.index("--continue-steps") + 1] == "2400"
    # after the wheels and imports (~40 s on the GPU, none here): data ~15 s, baseline 56 s, control 132 s (session
    # 13), two plans 114 s each (session 23); the deadline already leaves 70 s for the latency
    assert int(sweep[sweep.index("--deadline-s") + 1]) - 40 >= 15 + 56 + 132 + 2 * 114

    root = Path(__file__).resolve().parent.parent
    bin_dir = tmp_path / "seed0" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "python3"
    fake.write_text('#!/bin/bash\necho "$*" >> "%s"\nexit 0\n' % (tmp_path / "seed0" / "calls"))
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "seed0" / "out"),
           "SEED": "0"}
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    sweep = next(line.split() for line in (tmp_path / "seed0" / "calls").read_text().splitlines()
                 if "bench_accuracy_sweep" in line)
    assert sweep[sweep.index("--seed") + 1] == "0" and "--control-from" in sweep and "--control-first" not in sweep

    # the sweep's settings are those of the sweep its control comes from: it gets past load_control to training
    class Trains(Exception):
        pass

    def train(*args, **kwargs):
        raise Trains

    monkeypatch.setattr(bench_accuracy_sweep, "load_fashion_mnist", lambda **kw: None)
    monkeypatch.setattr(bench_accuracy_sweep, "run_one", train)
    monkeypatch.setattr(bench_accuracy_sweep, "resolve_device", lambda *a, **kw: None)  # (its argv names cuda)
    threads = torch.get_num_threads()
    argv = sweep[sweep.index("benchmarks.bench_accuracy_sweep") + 1:]
    try:
        with pytest.raises(Trains):
            bench_accuracy_sweep.main([*argv[:argv.index("--out") + 1], str(tmp_path / "s.json"),
                                       *argv[argv.index("--out") + 2:]])
    finally:
        torch.set_num_threads(threads)


def test_plan_pick_prefers_the_fast_enough_in_order_then_the_fastest(tmp_path):
    import torch

    from benchmarks import bench_plan_pick

    speedups = {"accurate": 1.2, "fast": 1.7, "faster": 1.9, "slow": 1.0, "near": 1.5}
    assert bench_plan_pick.pick(speedups, 1.6, 2) == ["fast", "faster"]  # the given order, not the speed
    assert bench_plan_pick.pick(speedups, 1.6, 4) == ["fast", "faster", "near", "accurate"]
    assert bench_plan_pick.pick(speedups, 2.0, 1) == ["faster"]
    args, threads = tmp_path / "picked.txt", torch.get_num_threads()
    try:  # it times on one thread, as the sweeps do
        result = bench_plan_pick.main(["--quick", "--plan", "a=blocks.1.0.bn1.act", "--plan", "b=bn1,blocks.0.0",
                                       "--min-speedup", "0", "--max-plans", "1", "--out", str(tmp_path / "pick.json"),
                                       "--args-out", str(args)])
    finally:
        torch.set_num_threads(threads)
    assert [r["plan"] for r in result["rows"]] == ["a", "b"] and result["picked"] == ["a"]
    assert args.read_text() == "--plan a=blocks.1.0.bn1.act\n"
    assert json.loads((tmp_path / "pick.json").read_text())["rows"][0]["speedup_vs_bn_fused"] > 0


def test_plan_estimate_adds_measured_whole_blocks_and_estimates_fused_ones(tmp_path):
    from benchmarks import estimate_plan_gains as est

    out = tmp_path / "est.json"
    result = est.main(["--plan", "whole=bn1,blocks.4.1", "--plan", "fused=blocks.1.0.bn1.act", "--out", str(out)])
    gains = json.loads((Path(est.RESULTS_DIR) / "fold_gains_cuda_b128.json").read_text())
    base, groups = gains["baseline_ms"], gains["groups"]
    whole, fused = result["rows"]
    # whole groups: exactly their measured savings, summed
    expected = 2 * base - groups["bn1.act"]["ms"] - groups["blocks.4.1.bn1.act"]["ms"]
    assert whole["saving_ms"] == pytest.approx(expected, abs=2e-3)
    assert whole["speedup_estimate"] == whole["speedup_convs_only"] == pytest.approx(base / (base - expected), 2e-3)
    # the fit: each whole block's saving is its conv part + fitted activations + miss, and the misses are orthogonal
    # to the activation elements (least squares through zero); blocks.1.0's expand output is 96 x 112 x 112
    rate = result["activation_ms_per_1e9_elements"] / 1e9
    blocks = {b["block"]: b for b in result["blocks"]}
    assert len(blocks) == 15 and "blocks.0.0" not in blocks
    for b in blocks.values():
        assert b["conv_part_ms"] + b["activations_fit_ms"] + b["residual_ms"] == pytest.approx(b["whole_ms_measured"],
                                                                                               abs=2e-3)
    assert sum(b["residual_ms"] * b["activations_fit_ms"] for b in blocks.values()) == pytest.approx(0, abs=1e-2)
    b10 = blocks["blocks.1.0"]
    assert b10["fused_estimate_ms"] == pytest.approx(b10["fused_conv_part_ms"] + rate * 96 * 112 * 112 * 128, abs=2e-3)
    assert fused["saving_ms"] == pytest.approx(b10["fused_estimate_ms"], abs=2e-3)
    assert fused["speedup_convs_only"] == pytest.approx(base / (base - b10["fused_conv_part_ms"]), abs=2e-3)
    assert json.loads(out.read_text())["rows"] == result["rows"]
    for bad, match in (("blocks.1.0.bn2.act", "expand activation"), ("blocks.1.0,blocks.1.0.bn1.act", "both")):
        with pytest.raises(SystemExit, match=match):
            est.main(["--plan", f"x={bad}", "--out", str(tmp_path / "no.json")])
    assert not (tmp_path / "no.json").exists()


def test_gpu_ablation_times_the_single_sites_around_l002(tmp_path):
    run = next(line.split() for line in _python_calls(tmp_path, "gpu_ablation.sh") if "bench_plan_ablation" in line)
    assert "--sites" in run and run[run.index("--plan") + 1].startswith("l002=bn1,blocks.1.1,")
    assert "blocks.1.0" not in run[run.index("--plan") + 1] and "--gains-out" in run


# ------------------------------------------------------------------------------------------------ review fixes


def test_gpu_overhead_measures_issue_3s_open_cells_in_time_with_arguments_the_benchmarks_take(tmp_path, monkeypatch):
    """Issue 3's prepared GPU call: the eager step at batch 128 and 64, a profile, then whole-model compile with and
    without per-channel α and with CUDA graphs; every bench_train_overhead command parses, and the limits fit."""
    from benchmarks import bench_train_overhead as bto

    calls = [line.split() for line in _python_calls(tmp_path, "gpu_overhead.sh") if line.startswith("-m ")]
    assert [c[1] for c in calls] == ["benchmarks.bench_train_overhead"] * 2 + ["benchmarks.profile_step"] + [
        "benchmarks.bench_train_overhead"] * 2
    assert [c[c.index("--batch") + 1] for c in calls] == ["128", "64", "64", "64", "64"]
    compiled, graphs = calls[3], calls[4]
    assert "--channel-alpha" in compiled and "--compile-mode" not in compiled
    assert graphs[graphs.index("--compile-mode") + 1] == "reduce-overhead"
    seen = []
    monkeypatch.setattr(bto, "run", lambda *args: seen.append(args) or {"rows": []})
    monkeypatch.setattr(bto, "resolve_device", lambda *args, **kwargs: None)  # (--device cuda, on this CPU)
    for call in (calls[0], calls[1], compiled, graphs):
        bto.main(call[2:])
    assert [(a[8], a[10], a[11]) for a in seen] == [(False, None, False), (False, None, False),
                                                    (True, None, True), (True, "reduce-overhead", False)]
    log = (tmp_path / "out" / "log.txt").read_text()
    limits = [int(n) for n in re.findall(r"\(limit (\d+) s\)", log)]  # a step starts only if its limit is left
    assert len(limits) == 5 and "skipped" not in log  # (here each returns at once)
    assert 15 + sum(limits[:4]) <= 580  # ~15 s of imports, then all but the CUDA-graph step at their limits

    monkeypatch.setenv("END_S", "100")  # a late start: the steps that no longer fit are skipped, not cut short
    log_path = tmp_path / "out" / "log.txt"
    log_path.unlink()
    (tmp_path / "calls.txt").unlink()
    (tmp_path / "bin").rename(tmp_path / "bin_used")
    _python_calls(tmp_path, "gpu_overhead.sh")
    log = log_path.read_text()
    assert log.count("skipped") == 2 and "profile of a batch-64 step (limit 90 s)" in log
    assert "compiled whole, batch 64, with per-channel α skipped: 100 s left, it needs 270" in log


def _python_calls(tmp_path: Path, script: str) -> list[str]:
    """The ``python3`` command lines that ``benchmarks/<script>`` runs (with :func:`_fake_python`); it must exit 0."""
    bin_dir, calls = _fake_python(tmp_path)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", f"benchmarks/{script}"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return calls.read_text().splitlines()


def _fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A ``python3`` that only records its arguments (gpu_all.sh's steps, without torch or a GPU)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(f'#!/bin/bash\necho "$*" >> "{calls}"\n')
    fake.chmod(0o755)
    return bin_dir, calls


def test_gpu_all_creates_its_output_folder_and_never_runs_the_sweep_without_a_limit(tmp_path):
    """With an OUT that does not exist yet (the README's own example) every step used to be skipped: each step's
    ``>>"$OUT/log.txt"`` failed before the command ran. And with no time left, ``timeout 0`` would have run the sweep
    without any limit."""
    bin_dir, calls = _fake_python(tmp_path)
    out = tmp_path / "not" / "yet"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "ONLY": "merge,sweep",
           "TOTAL_S": "0"}
    proc = subprocess.run(["bash", "benchmarks/gpu_all.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "No such file" not in proc.stderr
    ran = calls.read_text()
    assert "benchmarks.bench_merge_policy" in ran and "bench_accuracy_sweep" not in ran
    log = (out / "log.txt").read_text()
    assert "merge policies of the committed plans" in log and "accuracy sweep skipped" in log


def test_train_overhead_times_the_variants_in_a_fresh_random_order_each_round(monkeypatch):
    """A rotated fixed order had ``prepared`` right after ``timm`` in two rounds of three."""
    import torch

    from benchmarks import bench_train_overhead as bto

    seen: list[str] = []
    models = {name: torch.nn.Linear(2, 2) for name in ("timm", "prepared", "prepared_eager")}
    names = {id(m): name for name, m in models.items()}
    monkeypatch.setattr(bto, "train_step", lambda model, *a: seen.append(names[id(model)]))
    x = torch.zeros(1, 2)
    samples = bto.time_steps(models, x, x, rounds=30, warmup=0, budget_s=1e9)
    assert all(len(s) == 30 for s in samples.values())
    rounds = [tuple(seen[i:i + 3]) for i in range(0, len(seen), 3)]
    assert all(sorted(r) == sorted(models) for r in rounds)
    after_timm = [r[r.index("timm") + 1] for r in rounds if r.index("timm") < 2]
    assert len(set(rounds)) >= 4 and len(set(after_timm)) == 2


def test_train_overhead_aa_control_times_a_separate_equal_copy_of_timm_and_is_no_requirement(monkeypatch):
    """``--aa-control``: the twin is a second model with the same weights (the same object twice would share its
    caches and optimizer), its ratio is reported as the noise floor and not judged against 1.05."""
    import torch

    from benchmarks import bench_train_overhead as bto

    real_time_steps = bto.time_steps

    def checked(variants, *args):
        twin, timm_model = variants["timm_twin"], variants["timm"]
        assert twin is not timm_model
        assert all(a is not b and torch.equal(a, b) for a, b in zip(twin.parameters(), timm_model.parameters()))
        return real_time_steps(variants, *args)

    monkeypatch.setattr(bto, "time_steps", checked)
    row = bto.run(("mobilenetv2_050",), 2, 32, 1, 3, 1, 60.0, "cpu", compile_variants=False, aa_control=True)["rows"][0]
    assert row["timm_twin_ms"] > 0 and 0.2 < row["ratio_aa"] < 5
    assert "aa" not in row["within_required"] and "timm_twin" not in row["within_required"]

    seen = []
    monkeypatch.setattr(bto, "run", lambda *args: seen.append(args[-1]) or {"rows": []})
    monkeypatch.setattr(bto, "write_json", lambda *a: None)
    bto.main(["--models", "a", "--aa-control"])
    bto.main(["--models", "a"])
    assert seen == [True, False]  # the flag reaches run


def test_channel_alpha_variant_computes_the_same_under_compile_through_a_per_channel_alpha():
    """``--channel-alpha`` (a GPU experiment): the compiled graph broadcasts α per channel, and output and every
    gradient (α's included) are the plain site's, in float64."""
    import torch

    import hf_layerfold as lf
    from benchmarks.bench_train_overhead import ChannelAlphaSite, channel_alpha_copy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5),
                              lf.FoldableActivation(torch.nn.ReLU6(), "s", 0.3, blend="eager"),
                              torch.nn.Conv2d(5, 4, 1)).double()
    chan = channel_alpha_copy(net)
    assert type(chan[2]) is ChannelAlphaSite and type(net[2]) is lf.FoldableActivation
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    x = torch.randn(2, 3, 9, 9, dtype=torch.float64) * 3
    results = []
    for model in (net, torch.compile(chan, backend=record)):
        out = model(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    assert len(graphs) == 1 and "expand" in graphs[0]
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert chan[2].alpha.grad.abs() > 0


def test_train_overhead_json_is_written_after_every_row_and_names_every_thread_count(tmp_path, monkeypatch):
    """A time-boxed call (gpu_all.sh's ``timeout``) keeps the rows it finished; the device line names all thread
    counts (it used to name only the last, e.g. 'torch threads 2' over rows at 1 and 2 threads)."""
    from benchmarks import bench_train_overhead as bto

    out = tmp_path / "overhead.json"
    written: list[dict] = []

    def fake_run(models, batch, size, threads, *args):
        if out.exists():
            written.append(json.loads(out.read_text()))
        return {"rows": [{"model": models[0], "batch": batch, "input_size": size, "threads": threads,
                          "ratio_prepared": 1.0}]}

    monkeypatch.setattr(bto, "run", fake_run)
    data = bto.main(["--models", "a,b", "--threads", "1,2", "--out", str(out)])
    assert [len(w["rows"]) for w in written] == [1, 2, 3] and all(w["complete"] is False for w in written)
    final = json.loads(out.read_text())
    assert final == data and "complete" not in final and len(final["rows"]) == 4
    assert final["device"]["torch_threads"] == [1, 2]
    assert "torch threads 1/2" in report.device_label(final["device"])


def test_accuracy_sweep_marks_the_target_verdict_once_the_target_cell_is_timed():
    """``meets_target`` is set after every latency cell (a sweep stopped in a later cell kept no verdict at all and
    the report then said 'no'); it takes the larger of the two losses."""
    from benchmarks.bench_accuracy_sweep import TARGET_CELL, mark_targets

    rows = [{"run": "lambda=0", "lambda_reg": 0.0, "top1_gap_points": 0.0, "speedup": {TARGET_CELL: 1.0}},
            {"run": "a", "lambda_reg": 0.02, "top1_gap_points": 0.4, "speedup": {TARGET_CELL: 1.7}},
            {"run": "b", "lambda_reg": 0.02, "top1_gap_points": 0.1, "top1_gap_vs_control_points": 0.6,
             "speedup": {TARGET_CELL: 1.7}},
            {"run": "c", "lambda_reg": 0.04, "top1_gap_points": 0.5, "speedup": {TARGET_CELL: 1.59}},
            {"run": "d", "lambda_reg": 0.04, "top1_gap_points": 0.0, "speedup": {"cpu b1 224 float32": 2.0}}]
    mark_targets(rows)
    assert [r["meets_target"] for r in rows] == [False, True, False, False, None]


def test_profile_step_keeps_the_site_times_when_the_model_profile_does_not_finish(tmp_path, monkeypatch):
    from benchmarks import profile_step

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # what a time limit does mid-profile

    monkeypatch.setattr(profile_step, "profile_model", stopped)
    out = tmp_path / "profile.json"
    with pytest.raises(KeyboardInterrupt):
        profile_step.main(["--model", "mobilenetv2_050", "--batch", "2", "--input-size", "32", "--site-rounds", "1",
                           "--out", str(out)])
    assert "prepared_auto" in json.loads(out.read_text())["site_host_us"]


def test_latency_inner_count_ignores_a_single_slow_timed_call():
    """One timed forward slowed by a hiccup used to size ``inner`` for every sample of the cell."""
    import time

    import torch

    from benchmarks.bench_latency import _auto_inner

    class Hiccup(torch.nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            time.sleep(0.05 if self.calls == 2 else 0.002)  # the first timed call is slow
            return x

    assert _auto_inner({"m": Hiccup()}, torch.zeros(1), target_ms=20.0) >= 5


def test_sweep_device_line_names_the_cudnn_setting_its_latency_ran_with():
    """A CUDA sweep records ``device_info`` before training (cudnn.benchmark off) and then times with it on; the
    heading said 'cudnn.benchmark=False' over speed-ups measured with it on."""
    from benchmarks import bench_accuracy_sweep

    source = Path(bench_accuracy_sweep.__file__).read_text()
    assert 'result["device"]["latency_cudnn_benchmark"] = True' in source
    info = {"gpu": "Test GPU", "cudnn_benchmark": False, "latency_cudnn_benchmark": True}
    assert "cudnn.benchmark=False (latency: True)" in report.device_label(info)
    assert "(latency" not in report.device_label({"gpu": "Test GPU", "cudnn_benchmark": True})


def test_overhead_cells_name_the_launch_route_when_recorded():
    row = {"model": "m", "batch": 64, "threads": 2}
    assert report._overhead_cell(row, cpu=True) == "m b64 2 thr"
    assert report._overhead_cell({**row, "direct_launch": {"forward": 2, "backward": 2}}, cpu=False) == \
        "m b64 (direct launch)"
    for jit in ({"forward": "off", "backward": "off"}, {"forward": 0, "backward": 0}):  # 0: adopted for nothing
        assert report._overhead_cell({**row, "direct_launch": jit}, cpu=False) == "m b64 (JIT launch)"
    assert report._overhead_cell({**row, "direct_launch": {"forward": 1, "backward": 0}}, cpu=False) == \
        "m b64 (partly direct)"


def test_control_from_refuses_a_sweep_on_another_device_or_without_a_control(tmp_path):
    from benchmarks.bench_accuracy_sweep import control_mismatch, load_control, reuse_control

    settings = {"seed": 2, "steps": 10, "plan_ramp_steps": 0}
    rows = [{"run": "lambda=0", "top1_pct": 90.0, "top5_pct": 99.0, "control": False},
            {"run": "lambda=0 continued", "top1_pct": 91.0, "top5_pct": 99.5, "control": True, "train_s": 9.0}]
    sweep = {"settings": {**settings, "plan_ramp_steps": 300}, "device": {"device": "cuda"}, "quick": False,
             "rows": rows}
    path = tmp_path / "cuda.json"
    path.write_text(json.dumps(sweep))
    with pytest.raises(SystemExit, match=r"other settings .*'device': \('cuda', 'cpu'\)"):
        load_control(path, settings, "cpu", False)
    control = load_control(path, settings, "cuda", False)  # a ramp shapes the plans only, never the control
    assert control["row"]["top1_pct"] == 91.0 and control["row"]["reused_from"] == "cuda.json"
    assert "train_s" not in control["row"]  # the other sweep's timing is not this one's
    assert "its λ = 0 run (90.0 / 99.0 % top-1 / top-5) differs" in control_mismatch(
        control, {"top1_pct": 90.0, "top5_pct": 99.1})
    assert control_mismatch(control, {"top1_pct": 90.0, "top5_pct": 99.0}) is None
    assert reuse_control(control)["row"]["top1_pct"] == 91.0
    with pytest.raises(SystemExit, match=r"'merge_costs': \('cpu:1:64', None\)"):  # recorded there only
        path.write_text(json.dumps({**sweep, "settings": {**settings, "merge_costs": "cpu:1:64"}}))
        load_control(path, settings, "cuda", False)
    path.write_text(json.dumps(sweep))
    path.write_text(json.dumps({**sweep, "rows": rows[:1]}))
    with pytest.raises(SystemExit, match="no finished λ = 0 run and control"):
        load_control(path, settings, "cuda", False)
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="not a readable sweep JSON"):
        load_control(path, settings, "cuda", False)


def test_report_writes_where_it_is_told_and_leaves_the_readme(tmp_path):
    """``python -m benchmarks.report`` took no arguments and always rewrote the committed results and README."""
    from benchmarks import report

    root = Path(__file__).resolve().parent.parent
    shutil.copy(root / "benchmarks" / "results" / "fold_time.json", tmp_path)
    readme = (root / "README.md").read_text()
    report.main(["--results-dir", str(tmp_path)])
    assert "fold_time.json" in (tmp_path / "RESULTS.md").read_text()
    assert (root / "README.md").read_text() == readme


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("module, required", [("bench_train_overhead", []), ("profile_step", ["--out", "x.json"]),
                                              ("bench_plan_pick", ["--plan", "p=bn1"]),
                                              ("bench_plan_ablation", ["--plan", "p=bn1"])])
def test_cuda_asked_for_without_a_gpu_is_one_line_before_any_model(module, required, capsys):
    """These four printed a driver traceback (two after building and folding every model)."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"benchmarks.{module}").main(["--device", "cuda", *required])
    assert exit_info.value.code == 2
    assert "device 'cuda' requested but CUDA is not available on this machine" in capsys.readouterr().err
