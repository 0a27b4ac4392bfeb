"""Shared pieces of the engine benchmarks: device description, fold plans, the hand-built reference, timing.

Only torch, timm and hf_layerfold are needed here, so ``benchmarks/gpu_suite.py`` can run on a bare GPU box.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models import _efficientnet_blocks as eb

import hf_layerfold as lf
from hf_layerfold.files import write_text_atomic
from hf_layerfold.layers import PaddedConv2d
from hf_layerfold.padding import chain_padding
from hf_layerfold.timing import cpu_model_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LF_DM1_BLOCKS = ["blocks.1.1", "blocks.2.1", "blocks.3.1", "blocks.3.2", "blocks.4.0"]
PLAN_NAMES = ("lf_dm1", "s1_all", "ir_all", "all")
PLAN_HELP = {
    "bn_fused": "no site linear: BatchNorm folded into the convs (fold_model with the empty plan)",
    "lf_dm1": "published Layer Folding MobileNetV2-1.0 plan: blocks 1.1, 2.1, 3.1, 3.2, 4.0",
    "s1_all": "every site inside a stride-1 InvertedResidual block",
    "ir_all": "every site inside any InvertedResidual block (the shapes of the reference ceilings' 'all')",
    "all": "every foldable site (stem and depthwise-separable block included)",
}


# ------------------------------------------------------------------------------------------------ environment


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process) from /proc, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        total_busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # minus idle, iowait
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return total_busy, int(own[11]) + int(own[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


class LoadMeter:
    """CPU cores busy with *other* processes while a measurement ran (a shared machine skews latency)."""

    def __enter__(self) -> LoadMeter:
        self.start, self.t0 = _cpu_jiffies(), time.perf_counter()
        self.result: dict = {}
        return self

    def __exit__(self, *exc) -> None:
        end, wall = _cpu_jiffies(), time.perf_counter() - self.t0
        if self.start is None or end is None or wall <= 0:
            return
        hz = os.sysconf("SC_CLK_TCK")
        busy, own = end[0] - self.start[0], end[1] - self.start[1]
        self.result = {"other_processes_cores": round(max(busy - own, 0) / hz / wall, 2),
                       "this_process_cores": round(own / hz / wall, 2), "loadavg": loadavg()}


def device_info(device: str = "cpu") -> dict:
    """What a result was measured on; every JSON written by the benchmarks carries this."""
    info = {
        "device": device,
        "cpu": cpu_model_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "hf_layerfold": lf.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": loadavg(),
    }
    if importlib.util.find_spec("triton") is not None:  # the blend kernels' compiler (and DirectLaunch's default)
        try:
            info["triton"] = importlib.import_module("triton").__version__
        except Exception:  # noqa: BLE001 - a broken install is recorded as such
            info["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """``data`` as indented JSON, written atomically: a run cut short leaves the last whole version."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------------------------ models, plans


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, as tests/conftest.randomize_bn does, so BN fusion is exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def create_prepared(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A timm model with random weights and BN statistics, prepared for folding (eval mode)."""
    torch.manual_seed(seed)
    model = randomize_bn(timm.create_model(name, pretrained=False, **kwargs), seed).eval()
    return lf.prepare_model(model)


def _sites_in_blocks(model: nn.Module, keep: Callable[[eb.InvertedResidual], bool]) -> tuple[str, ...]:
    blocks = [name for name, m in model.named_modules() if isinstance(m, eb.InvertedResidual) and keep(m)]
    return tuple(s for s in lf.foldable_sites(model) if any(s.startswith(b + ".") for b in blocks))


def make_plan(model: nn.Module, name: str) -> lf.FoldPlan | None:
    """The named plan for a prepared model, or ``None`` where it does not exist (e.g. block names missing)."""
    if name == "bn_fused":
        return lf.FoldPlan()
    if name == "lf_dm1":
        try:
            return lf.FoldPlan.from_blocks(model, LF_DM1_BLOCKS)
        except ValueError:
            return None
    if name == "s1_all":
        sites = _sites_in_blocks(model, lambda b: tuple(b.conv_dw.stride) == (1, 1))
    elif name == "ir_all":
        sites = _sites_in_blocks(model, lambda b: True)
    elif name == "all":
        sites = tuple(lf.foldable_sites(model))
    else:
        raise ValueError(f"unknown plan {name!r}; known: bn_fused, {', '.join(PLAN_NAMES)}")
    return lf.FoldPlan(sites) if sites else None


def random_plan(model: nn.Module, seed: int | str, p: float = 0.5) -> lf.FoldPlan:
    rng = random.Random(seed)
    return lf.FoldPlan(tuple(s for s in lf.foldable_sites(model) if rng.random() < p))


# ------------------------------------------------------------------------------------------------ hand-built


class _Add(nn.Module):
    """``body(x) + x`` (or ``+ shortcut(x)``): the residual of a plain hand-written network."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return self.body(x) + x
        return self.body(x) + self.shortcut(x)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int, act: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = act
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(s)


_TORCH_ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "timm_swish": nn.SiLU, "hardswish": nn.Hardswish,
    "timm_hard_swish": nn.Hardswish, "sigmoid": nn.Sigmoid, "timm_sigmoid": nn.Sigmoid,
    "hardsigmoid": nn.Hardsigmoid, "timm_hard_sigmoid": nn.Hardsigmoid, "gelu": nn.GELU, "timm_gelu": nn.GELU,
    "tanh": nn.Tanh, "timm_tanh": nn.Tanh, "mish": nn.Mish, "timm_mish": nn.Mish,
}


def _act(spec: dict) -> nn.Module:
    name = spec["name"]
    if name == "gelu" and spec.get("approximate"):
        return nn.GELU(approximate=spec["approximate"])
    if name in _TORCH_ACTS:
        return _TORCH_ACTS[name]()
    if name == "leaky_relu":
        return nn.LeakyReLU(spec.get("negative_slope", 0.01))
    if name == "elu":
        return nn.ELU(spec.get("alpha", 1.0))
    if name == "prelu":
        return nn.PReLU(spec.get("num_parameters", 1))
    raise ValueError(f"hand-built reference has no activation {name!r}")


def _record_pads(folded: nn.Module, x: torch.Tensor) -> list:
    """Front padding each ``PaddedConv2d`` of the folded model applies at this input size, in module order."""
    pads: list = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: pads.append(
        chain_padding(mod.pad_rules, inp[0].shape[-2], inp[0].shape[-1])))
        for m in folded.modules() if isinstance(m, PaddedConv2d)]
    try:
        with torch.inference_mode():
            folded(x)
    finally:
        for h in hooks:
            h.remove()
    return pads


def _hand_layers(specs: list[dict], pads: list) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for spec in specs:
        kind = spec["type"]
        if kind == "conv":
            args = (spec["in"], spec["out"], tuple(spec["kernel"]))
            kw = dict(stride=tuple(spec["stride"]), dilation=tuple(spec.get("dilation", (1, 1))),
                      groups=spec["groups"], bias=spec["bias"])
            if "pad_rules" in spec:  # input-size dependent padding: fixed for the benchmarked size
                left, right, top, bottom = pads.pop(0)
                if left == right and top == bottom:
                    layers.append(nn.Conv2d(*args, padding=(top, left), **kw))
                else:
                    layers += [nn.ZeroPad2d((left, right, top, bottom)), nn.Conv2d(*args, padding=0, **kw)]
            else:
                layers.append(nn.Conv2d(*args, padding=tuple(spec["padding"]), **kw))
        elif kind == "act":
            layers.append(_act(spec))
        elif kind == "residual":
            body = nn.Sequential(*_hand_layers(spec["branch"], pads))
            shortcut = None if spec.get("shortcut") is None else nn.Sequential(*_hand_layers(spec["shortcut"], pads))
            layers.append(_Add(body, shortcut))
        elif kind == "se":
            layers.append(_SqueezeExcite(spec["channels"], spec["rd_channels"], _act(spec["act"]), _act(spec["gate"])))
        elif kind == "maxpool":
            layers.append(nn.MaxPool2d(spec["kernel_size"], spec["stride"], spec["padding"], spec["dilation"],
                                       ceil_mode=spec["ceil_mode"]))
        elif kind == "dropout":
            continue  # inference only
        else:
            raise ValueError(f"hand-built reference cannot build a {kind!r} layer")
    return layers


def hand_built(folded: nn.Module, input_size: int = 224) -> nn.Sequential:
    """A plain ``nn.Sequential`` with fresh convs of the folded model's shapes and its weights.

    Built from the folded model's JSON layer list with torch modules only (no ``LayerFoldedNet``, no
    ``PaddedConv2d``, no hf_layerfold ``Residual``): the fastest eager network of those shapes one would write
    by hand for a fixed input size. Checked to compute the same output as ``folded``.
    """
    args = folded.model_args
    param = next(folded.parameters())
    x = torch.randn(1, args.get("in_chans", 3), input_size, input_size, dtype=param.dtype)
    pads = _record_pads(folded, x)
    layers = _hand_layers(args["features"], pads)
    if args["pre_logits"]:
        layers += [nn.AdaptiveAvgPool2d(1), *_hand_layers(args["pre_logits"], pads), nn.Flatten(1)]
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    if args["num_classes"] > 0:
        layers.append(nn.Linear(folded.head_hidden_size, args["num_classes"]))
    hand = nn.Sequential(*layers).to(param.dtype).eval()
    src, dst = list(folded.parameters()), list(hand.parameters())
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src, dst)):
        raise RuntimeError("hand-built reference does not match the folded model's parameters")
    with torch.no_grad():
        for a, b in zip(src, dst):
            b.copy_(a)
        ref, out = folded(x), hand(x)
    err = float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-30))
    if err > (1e-4 if param.dtype != torch.float64 else 1e-10):
        raise RuntimeError(f"hand-built reference differs from the folded model (rel. err {err:.2e})")
    return hand


# ------------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(models: dict[str, nn.Module], x: torch.Tensor, *, rounds: int, warmup: int = 3,
                     inner: int = 1, budget_s: float | None = None, min_rounds: int = 5) -> dict[str, list[float]]:
    """Per-forward latencies (ms) of each model, one sample per round, models interleaved within a round.

    Each round visits every model once, in a fresh random order (a fixed order lets a model always follow its
    same-shape twin, whose warm caches then favour one of the two by a few percent), timing ``inner``
    back-to-back forwards under ``torch.inference_mode``; drift of a shared machine then hits all models alike.
    ``budget_s`` caps the wall time: the round count shrinks (not below ``min_rounds``) to fit.
    """
    names = list(models)
    device = x.device
    order = random.Random(0)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                models[name](x)
        sync(device)
        start = time.perf_counter()
        r = 0
        while r < rounds:
            for name in order.sample(names, len(names)):
                model = models[name]
                sync(device)
                t0 = time.perf_counter()
                for _ in range(inner):
                    model(x)
                sync(device)
                samples[name].append((time.perf_counter() - t0) * 1e3 / inner)
            r += 1
            if budget_s is not None and r >= min_rounds:
                per_round = (time.perf_counter() - start) / r
                rounds = min(rounds, max(min_rounds, int(budget_s / per_round)))
    return samples


def summarize(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {"median_ms": round(statistics.median(samples), 4), "p25_ms": round(q[0], 4), "p75_ms": round(q[2], 4),
            "min_ms": round(min(samples), 4), "n": len(samples)}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b (the two were timed side by side in each round)."""
    return statistics.median(x / y for x, y in zip(a, b))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
