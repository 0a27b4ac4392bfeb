"""Smoke test of the benchmark runner: quick mode on a tiny timm model writes real JSON, markdown and plots."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package
from benchmarks import report  # noqa: E402


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


def test_report_renders_accuracy_sweep_schema(tmp_path):
    """The accuracy-sweep JSON described in benchmarks/README.md becomes a table and a plot."""
    sweep = {"benchmark": "accuracy_sweep", "device": {"cpu": "example cpu", "torch": "x"}, "dataset": "fashion_mnist",
             "model": "m", "baseline": {"top1": 90.0, "nonlinear_layers": 35},
             "points": [{"label": "a", "nonlinear_layers": 12, "top1": 89.0, "speedup": 1.5},
                        {"label": "b", "nonlinear_layers": 5, "top1": 85.0, "speedup": None}]}
    (tmp_path / "accuracy_sweep.json").write_text(json.dumps(sweep))
    (tmp_path / "train_overhead.json").write_text(json.dumps(
        {"benchmark": "train_overhead", "device": "example gpu", "rows": [{"step": "search", "ms": 3.5}]}))
    md = report.build_report(tmp_path).read_text()
    assert "## Accuracy vs depth" in md and "| a | 12 |" in md
    assert "## Training overhead" in md and "| search | 3.5 |" in md and "Device: example gpu" in md
    assert (tmp_path / "accuracy_sweep.png").exists()
