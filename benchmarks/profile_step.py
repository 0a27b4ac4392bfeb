"""Where the α search's extra step time goes: one profiled training step of the timm model and of the prepared one.

``bench_train_overhead`` says how much a search step costs; this says where. Each model takes a few warm-up steps
(the same step as that benchmark: forward, cross-entropy, backward, fused AdamW, and for the prepared model the α
regularizer and clamp), then ``--steps`` steps under ``torch.profiler``. Written per model: wall time per step,
host time per step inside top-level torch ops (on CUDA: launching, not computing), device time per step, and the
ops with the most host and device time per step. A prepared step whose extra wall time matches its extra host
time, with the device time unchanged, is bound by Python and launches, not by memory traffic.

It also times one activation site alone (``site_host_us``): forward + backward of a tensor small enough that the
device work is negligible, so the time is the host's: the timm in-place ReLU6, the prepared site with
``blend="auto"`` (the Triton kernels on CUDA) and with ``blend="eager"``; on CPU, where Triton cannot launch, also
the Triton route with its two launches replaced by no-ops (what our wrapper costs around them), launched as Triton's
JIT would be (``triton_route_noop_launch``) and through ``DirectLaunch`` once adopted (``triton_route_noop_direct``);
on CUDA the real kernels both ways (``triton_route_jit``, ``triton_route_direct``: DirectLaunch switched on for
this variant whatever ``HF_LAYERFOLD_TRITON_DIRECT_LAUNCH`` says), and ``direct_launch`` records whether the sites'
own route (``prepared_auto``, which follows that variable) launched directly.

``--whole-compile`` profiles both models under ``torch.compile`` instead (what a user who compiles pays; the
warm-up steps compile, so give them enough).

``python -m benchmarks.profile_step --device cuda --batch 64 --out /tmp/profile_b64.json``
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import statistics
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import hf_layerfold as lf
from hf_layerfold import triton_blend
from hf_layerfold.timing import resolve_device

from .bench_train_overhead import make_optimizer, prepared_copy, train_step
from .harness import device_info, log, sync, write_json


def _top(events, key: str, n: int, steps: int) -> list[dict]:
    """The ``n`` ops with the most ``key`` time, per step."""
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"op": e.key, "calls_per_step": e.count / steps, "ms_per_step": round(getattr(e, key) / steps / 1e3, 3)}
            for e in rows]


def profile_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int,
                  top: int) -> dict:
    optim = make_optimizer(model)
    model.train()
    for _ in range(warmup):
        train_step(model, optim, x, y)
    sync(x.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, optim, x, y)
        sync(x.device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    device_key = "self_device_time_total" if x.is_cuda else None
    top_level = [e for e in prof.events() if e.cpu_parent is None and e.device_type.name == "CPU"]
    result = {"wall_ms_per_step": round(wall / steps * 1e3, 3),
              "host_ms_per_step": round(sum(e.cpu_time_total for e in top_level) / steps / 1e3, 3),
              "top_host_ops": _top(events, "self_cpu_time_total", top, steps)}
    if device_key:
        # A kernel's time is carried twice in key_averages(): by the kernel event itself (device_type CUDA) and by
        # the CPU op that launched it (its self_device_time_total). Count the kernels only, once each.
        kernels = [e for e in events if e.device_type.name != "CPU"]
        result["device_ms_per_step"] = round(sum(getattr(e, device_key) for e in kernels) / steps / 1e3, 3)
        result["top_device_ops"] = _top([e for e in events if e.device_type.name == "CPU"], device_key, top, steps)
        result["top_device_kernels"] = _top(kernels, device_key, top, steps)
    return result


class _NoOpLaunch:
    """Stands in for a Triton kernel where none can launch: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _AdoptedEverywhere(dict):
    """A ``DirectLaunch.direct`` table that holds a no-op launcher for every key (CPU stand-in)."""

    def get(self, key, default=None):
        return lambda grid, args: None


def _triton_route(site: lf.FoldableActivation, kernels: tuple, x: torch.Tensor) -> torch.Tensor:
    return triton_blend.TritonClampBlend.apply(x, site.alpha, site._bounds_like(x), kernels)


def _triton_route_noop(site: lf.FoldableActivation, direct: bool = False):
    """The prepared site's Triton route with no-op launches (CPU): everything but the kernels themselves; with
    ``direct``, through :class:`~hf_layerfold.triton_launch.DirectLaunch` in its adopted state (what the sites run
    on CUDA once checked), so its own host cost is counted."""
    kernels = (_NoOpLaunch(), _NoOpLaunch())
    if direct:
        kernels = triton_blend.direct_launchers(kernels, device_type="cpu", stream=lambda device: 0, enabled=True)
        for k in kernels:
            k.direct = _AdoptedEverywhere()
    return functools.partial(_triton_route, site, kernels)


def site_host_us(device: str, rounds: int = 30, inner: int = 300) -> dict[str, float]:
    """Host µs that one activation site adds to a training step (forward + backward), over an input that costs
    the same without it: median over interleaved rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the overhead benchmark's CUDA runs: one host thread launching
    torch.manual_seed(0)
    x0 = torch.randn(1, 8, 4, 4, device=device, requires_grad=True)
    g = torch.randn_like(x0)  # a dense upstream gradient, as a conv's backward hands over (``.sum()`` would give an
    # expanded one, which the Triton route first copies to x's layout: a launch a real step does not pay)
    relu6 = torch.nn.ReLU6(inplace=True)
    variants = {"none": lambda x: x, "timm_relu6_inplace": relu6}
    for blend in ("auto", "eager"):
        variants[f"prepared_{blend}"] = lf.FoldableActivation(torch.nn.ReLU6(), "site", 0.3, blend=blend).to(device)
    if device == "cuda" and triton_blend.triton_available():  # the same route, launched by the JIT or directly
        jit = triton_blend.build_kernels()
        direct = triton_blend.direct_launchers(jit, enabled=True)
        site = variants["prepared_auto"]
        for name, kernels in (("triton_route_jit", jit), ("triton_route_direct", direct)):
            variants[name] = functools.partial(_triton_route, site, kernels)
    if device == "cpu":
        variants["triton_route_noop_launch"] = _triton_route_noop(variants["prepared_auto"])
        if importlib.util.find_spec("triton") is not None:
            variants["triton_route_noop_direct"] = _triton_route_noop(variants["prepared_auto"], direct=True)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for r in range(rounds):
            for name, fn in variants.items():
                if r == 0:
                    for _ in range(inner // 10):
                        fn(x0 * 1.0).backward(g)
                sync(x0.device)
                start = time.perf_counter()
                for _ in range(inner):
                    fn(x0 * 1.0).backward(g)
                sync(x0.device)
                samples[name].append((time.perf_counter() - start) / inner * 1e6)
    finally:
        torch.set_num_threads(threads)
    none = statistics.median(samples.pop("none"))
    return {name: round(statistics.median(s) - none, 1) for name, s in samples.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="mobilenetv2_100")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--site-only", action="store_true", help="only the per-site host times, no model profile")
    parser.add_argument("--site-rounds", type=int, default=30)
    parser.add_argument("--whole-compile", action="store_true",
                        help="profile both models under torch.compile (the warm-up steps compile them)")
    args = parser.parse_args(argv)
    try:  # before building models: without a GPU, torch fails later with a driver traceback
        resolve_device(args.device, timing=True)
    except (RuntimeError, ValueError) as err:
        parser.error(str(err))
    data = {"benchmark": "profile_step", "title": "Where a search step's time goes", "device": device_info(args.device),
            "site_host_us": site_host_us(args.device, rounds=args.site_rounds),
            "direct_launch": triton_blend.direct_launch_state()}
    log(f"[profile_step] host µs per site, forward + backward: {data['site_host_us']}")
    write_json(args.out, data)  # kept even if a time limit stops the model profiles below
    if args.site_only:
        return data
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=1000).to(args.device)
    x = torch.randn(args.batch, 3, args.input_size, args.input_size, device=args.device)
    y = torch.randint(0, 1000, (args.batch,), device=args.device)
    models = {"timm": base, "prepared": prepared_copy(base, "auto")}
    if args.whole_compile:
        models = {f"{name}_compiled": torch.compile(copy.deepcopy(m)) for name, m in models.items()}
    data.update({"model": args.model, "batch": args.batch, "input_size": args.input_size, "steps": args.steps,
                 "profiles": {name: profile_model(m, x, y, args.steps, args.warmup, args.top)
                              for name, m in models.items()}})
    for name, prof in data["profiles"].items():
        log(f"[profile_step] {name}: " + ", ".join(f"{k} {v}" for k, v in prof.items() if k.endswith("per_step")))
    data["direct_launch"] = triton_blend.direct_launch_state()  # the model's activation sizes added their own keys
    write_json(args.out, data)
    return data


if __name__ == "__main__":
    main()
