"""Run the benchmark suite and rebuild ``RESULTS.md``: ``python -m benchmarks.run [--only ...] [--quick]``.

Engine benchmarks run in this process; the training-side ones (``bench_train_overhead``,
``bench_fashion_mnist_method``, ``bench_accuracy_sweep``) and ``bench_merge_policy`` run as
``python -m benchmarks.<module> --out JSON --device DEV [--quick]`` when their module exists. The report is rebuilt
from every JSON in the results folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ("exactness", "latency", "fold_time")
EXTERNAL = {"train_overhead": "bench_train_overhead", "fashion_mnist_method": "bench_fashion_mnist_method",
            "accuracy_sweep": "bench_accuracy_sweep", "merge_policy": "bench_merge_policy"}
QUICK_MODELS = ("mobilenetv2_050",)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_for_idle(max_wait_s: float, threshold: float = 0.5, window_s: float = 5.0) -> dict:
    """Wait (up to ``max_wait_s``) until other processes keep fewer than ``threshold`` cores busy."""
    from .harness import LoadMeter

    start = time.perf_counter()
    while True:
        with LoadMeter() as meter:
            time.sleep(window_s)
        others = meter.result.get("other_processes_cores", 0.0)
        waited = time.perf_counter() - start
        if others < threshold or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "other_processes_cores": others, "idle": others < threshold}
        _log(f"[run] machine busy ({others:.2f} cores used by others), waiting")


def run_external(kind: str, out: Path, device: str, quick: bool) -> str:
    module = f"benchmarks.{EXTERNAL[kind]}"
    if importlib.util.find_spec(module) is None:
        return f"skipped ({module} not present)"
    cmd = [sys.executable, "-m", module, "--out", str(out), "--device", device] + (["--quick"] if quick else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    _log(f"[run] {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    return "ok" if proc.returncode == 0 else f"failed (exit code {proc.returncode})"


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description="Run hf_layerfold benchmarks and rebuild RESULTS.md.")
    parser.add_argument("--only", default=",".join(ENGINE + tuple(EXTERNAL)),
                        help=f"comma list of {', '.join(ENGINE + tuple(EXTERNAL))} (the report always runs)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny model, small inputs, few repeats (smoke test)")
    parser.add_argument("--results-dir", default=None, help="where the JSON files and RESULTS.md go (default: "
                        "benchmarks/results, whose summary also goes into README.md; with --quick, "
                        "outputs/benchmarks-quick: a smoke test never replaces the committed results)")
    parser.add_argument("--models", default=None, help="latency / fold-time models (comma list)")
    parser.add_argument("--archs", default=None, help="exactness architectures (comma list)")
    parser.add_argument("--input-size", type=int, default=None, help="latency input size (default 224; quick 64)")
    parser.add_argument("--rounds", type=int, default=60, help="latency rounds per cell")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="before latency, wait up to this many seconds for other processes to go quiet")
    args = parser.parse_args(argv)
    only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = sorted(set(only) - set(ENGINE) - set(EXTERNAL) - {"report"})
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(ENGINE + tuple(EXTERNAL))}")
    results = Path(args.results_dir if args.results_dir is not None else
                   ROOT / ("outputs/benchmarks-quick" if args.quick else "benchmarks/results"))
    results.mkdir(parents=True, exist_ok=True)
    models = tuple(args.models.split(",")) if args.models else (QUICK_MODELS if args.quick else None)
    size = args.input_size or (64 if args.quick else 224)
    status: dict[str, str] = {}

    if "exactness" in only:
        from . import bench_exactness

        archs = tuple(args.archs.split(",")) if args.archs else (QUICK_MODELS if args.quick else bench_exactness.ARCHS)
        bench_exactness.run(results / "exactness.json", archs=archs, quick=args.quick)
        status["exactness"] = "ok"
    if "latency" in only:
        from . import bench_latency

        idle = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
        if idle:
            _log(f"[run] idle check: {idle}")
        if args.device == "cuda":
            from . import gpu_suite

            cmd = [str(results / "latency_cuda.json"), "--input-size", str(size), "--rounds", str(args.rounds)]
            if models:
                cmd += ["--models", ",".join(models)]
            gpu_suite.main(cmd + (["--batches", "1,8", "--budget-s", "30"] if args.quick else []))
        else:
            threads = (1,) if args.quick else (min(2, os.cpu_count() or 1), 1)  # quick: robust on a busy box
            bench_latency.run_cpu(results / "latency_cpu.json", models=models or bench_latency.MODELS,
                                  threads=threads, rounds=args.rounds, input_size=size, quick=args.quick)
        status["latency"] = "ok"
    if "fold_time" in only:
        from . import bench_fold_time

        bench_fold_time.run(results / "fold_time.json", models=models or bench_fold_time.MODELS, quick=args.quick)
        status["fold_time"] = "ok"
    for kind in EXTERNAL:
        if kind in only:
            # the committed names: train_overhead.json, accuracy_sweep.json, ... but merge_policy_cpu.json on the CPU
            suffix = "_cuda" if args.device == "cuda" else ("_cpu" if kind == "merge_policy" else "")
            status[kind] = run_external(kind, results / f"{kind}{suffix}.json", args.device, args.quick)
    from .report import build_report

    default_dir = results.resolve() == (ROOT / "benchmarks" / "results").resolve()
    status["report"] = str(build_report(results, readme=ROOT / "README.md" if default_dir else None))
    for kind, state in status.items():
        _log(f"[run] {kind}: {state}")
    return status


if __name__ == "__main__":
    main()
