"""Training-step cost of the α search: a prepared model (α learned) beside the same timm model without α.

One step = ``zero_grad`` + forward + cross-entropy + backward + AdamW step, in train mode. The variants are
timed side by side in every round (starting variant rotated), so drift of a shared machine hits them alike;
the reported ratio is the median over rounds of the per-round ratio. Variants:

* ``timm``: the model as timm builds it (in-place activations), no α.
* ``prepared``: ``prepare_model`` (every site a ``FoldableActivation`` with a learned α), search phase.
* ``fused_candidate``: the prepared model with the blend of ReLU/ReLU6 sites computed by the custom autograd
  function below (eager PyTorch, fewer passes; other activations keep the current path).
* ``compiled_candidate``: the same blend as one ``torch.compile(dynamic=True)`` function per activation kind, so
  forward and backward (α's reduction included) each become one fused kernel (inductor: C++ on CPU, Triton on GPU).

The two candidates are proposals for ``hf_layerfold/activation.py``, measured here before anything changes there.

``python -m benchmarks.bench_train_overhead --out benchmarks/results/train_overhead.json``
"""

from __future__ import annotations

import argparse
import copy
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import hf_layerfold as lf
from hf_layerfold.activation import FoldableActivation

from .harness import RESULTS_DIR, LoadMeter, device_info, log, paired_ratio, summarize, write_json

MODELS = ("mobilenetv2_100", "tf_efficientnet_lite0")
REQUIRED_RATIO = 1.05


class _ClampBlend(torch.autograd.Function):
    """``lerp(clamp(x, lo, hi), x, α)`` in two passes forward and about four backward, saving only ``x``.

    The generic path (``torch.lerp(act(x), x, α)`` under autograd) keeps ``act(x)`` alive, and its backward
    runs the lerp backward, the activation backward and a separate product + sum for α (about seven passes).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        ctx.save_for_backward(x, alpha)
        ctx.bounds = (lo, hi)
        return x.clamp(lo, hi).lerp_(x, alpha.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, alpha = ctx.saved_tensors
        lo, hi = ctx.bounds
        inside = torch.ops.aten.hardtanh_backward(grad, x, lo, hi)  # grad where lo < x < hi, else 0
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            # ∂L/∂α = Σ g·(x − clamp(x)): one fused reduction instead of a product tensor and a sum.
            excess = x - x.clamp(lo, hi)
            grad_alpha = torch.vdot(grad.reshape(-1), excess.reshape(-1)).to(alpha.dtype)
        grad_x = inside.lerp_(grad, alpha.to(grad.dtype)) if ctx.needs_input_grad[0] else None
        return grad_x, grad_alpha, None, None


def _bounds(act: nn.Module) -> tuple[float, float] | None:
    if isinstance(act, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(act, nn.ReLU):
        return 0.0, float("inf")
    if isinstance(act, nn.Hardtanh):
        return float(act.min_val), float(act.max_val)
    return None


class _FusedFoldable(nn.Module):
    """Drop-in forward for a searching ``FoldableActivation`` (same α Parameter), used by the candidate."""

    def __init__(self, site: FoldableActivation) -> None:
        super().__init__()
        self.site = site
        self.bounds = _bounds(site.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bounds is None or self.site.fixed is not None:
            return self.site(x)
        return _ClampBlend.apply(x, self.site.alpha, *self.bounds)


_COMPILED: dict[tuple[float, float], object] = {}


def _compiled_blend(lo: float, hi: float):
    """One compiled graph per clamp range; shapes are symbolic, so every site of a model shares it."""
    if (lo, hi) not in _COMPILED:
        def blend(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
            return torch.lerp(x.clamp(lo, hi if hi != float("inf") else None), x, alpha.to(x.dtype))

        _COMPILED[(lo, hi)] = torch.compile(blend, dynamic=True, fullgraph=True)
    return _COMPILED[(lo, hi)]


class _CompiledFoldable(_FusedFoldable):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bounds is None or self.site.fixed is not None:
            return self.site(x)
        return _compiled_blend(*self.bounds)(x, self.site.alpha)


def fused_candidate(prepared: nn.Module, kind: type[nn.Module] = _FusedFoldable) -> nn.Module:
    model = copy.deepcopy(prepared)
    for name, module in list(model.named_modules()):
        if isinstance(module, FoldableActivation):
            model.set_submodule(name, kind(module))
    return model


def check_candidate(model: nn.Module, fused: nn.Module, x: torch.Tensor) -> float:
    """Largest gradient difference (weights and α) between the generic and fused paths, relative to the largest
    gradient (parameters whose true gradient is ~0, like a bias before BatchNorm, would make a per-tensor ratio
    pure rounding noise)."""
    grads = []
    for m in (model, fused):
        m.zero_grad(set_to_none=True)
        m.train()
        m(x).float().pow(2).mean().backward()
        grads.append([p.grad for p in m.parameters()])
    pairs = [(a, b) for a, b in zip(*grads) if a is not None]
    scale = max(float(a.abs().max()) for a, _ in pairs)
    return max(float((a - b).abs().max()) for a, b in pairs) / scale


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    alphas = {id(a) for a in lf.alpha_parameters(model).values()}
    weights = [p for p in model.parameters() if id(p) not in alphas]
    groups = [{"params": weights, "weight_decay": 0.05}]
    if alphas:
        groups.append({"params": list(lf.alpha_parameters(model).values()), "lr": 1e-2, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=1e-3, foreach=False)


def time_steps(variants: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, rounds: int, warmup: int,
               budget_s: float) -> dict[str, list[float]]:
    optims = {name: _optimizer(m) for name, m in variants.items()}
    names = list(variants)
    for name in names:
        variants[name].train()
        for _ in range(warmup):
            _step(variants[name], optims[name], x, y)
    samples: dict[str, list[float]] = {n: [] for n in names}
    start, r = time.perf_counter(), 0
    while r < rounds:
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            t0 = time.perf_counter()
            _step(variants[name], optims[name], x, y)
            samples[name].append((time.perf_counter() - t0) * 1e3)
        r += 1
        if r >= 5 and (time.perf_counter() - start) / r * (r + 1) > budget_s:
            break
    return samples


def run(models: tuple[str, ...], batch: int, size: int, threads: int, rounds: int, warmup: int,
        budget_s: float, device: str) -> dict:
    torch.set_num_threads(threads)
    rows = []
    for name in models:
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False, num_classes=1000).to(device)
        prepared = lf.prepare_model(copy.deepcopy(base), lf.LayerFoldingConfig(alpha_init=0.3))
        fused = fused_candidate(prepared)
        compiled = fused_candidate(prepared, _CompiledFoldable)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        grad_err = check_candidate(prepared, fused, x[:2])
        t0 = time.perf_counter()
        compiled_err = check_candidate(prepared, compiled, x[:2])  # the first call compiles
        compile_s = time.perf_counter() - t0
        variants = {"timm": base, "prepared": prepared, "fused_candidate": fused, "compiled_candidate": compiled}
        log(f"[train_overhead] {name}: batch {batch} at {size}px, {threads} threads")
        with LoadMeter() as meter:
            samples = time_steps(variants, x, y, rounds, warmup, budget_s)
        stats = {k: summarize(v) for k, v in samples.items()}
        row = {"model": name, "batch": batch, "input_size": size, "threads": threads,
               "sites": len(lf.alpha_parameters(prepared)), "rounds": len(samples["timm"]),
               "timm_ms": stats["timm"]["median_ms"], "prepared_ms": stats["prepared"]["median_ms"],
               "fused_candidate_ms": stats["fused_candidate"]["median_ms"],
               "compiled_candidate_ms": stats["compiled_candidate"]["median_ms"]}
        for variant in ("prepared", "fused_candidate", "compiled_candidate"):
            row[f"ratio_{variant}"] = round(paired_ratio(samples[variant], samples["timm"]), 4)
            row[f"ratio_min_{variant}"] = round(stats[variant]["min_ms"] / stats["timm"]["min_ms"], 4)
        row.update({"fused_grad_rel_err": grad_err, "compiled_grad_rel_err": compiled_err,
                    "compile_s": round(compile_s, 1),
                    "others_cores": meter.result.get("other_processes_cores"), "loadavg": meter.result.get("loadavg")})
        row["within_required"] = row["ratio_prepared"] <= REQUIRED_RATIO
        rows.append(row)
        log(f"[train_overhead] {row}")
    return {"rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "train_overhead.json"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="mobilenetv2_050, 64 px, a few rounds")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=160)
    parser.add_argument("--threads", default="2", help="comma list of torch thread counts, one table row each")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=240.0, help="wall-time cap per model")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="first wait up to this many seconds for other processes to go quiet")
    args = parser.parse_args(argv)
    waited = None
    if args.wait_idle > 0:
        from .run import wait_for_idle

        waited = wait_for_idle(args.wait_idle)
    models = ("mobilenetv2_050",) if args.quick else tuple(args.models.split(","))
    size, rounds = (64, 6) if args.quick else (args.input_size, args.rounds)
    rows = []
    for threads in (int(t) for t in str(args.threads).split(",")):
        rows += run(models, args.batch, size, threads, rounds, args.warmup, args.budget_s, args.device)["rows"]
    result = {"rows": rows}
    data = {"benchmark": "train_overhead", "title": "Training overhead of the α search",
            "description": ("Median training-step time (fwd + bwd + AdamW step) of a prepared model in the search "
                            "phase vs the same timm model without α; ratio = median of per-round ratios "
                            f"(interleaved). Required: ratio_prepared ≤ {REQUIRED_RATIO}."),
            "device": device_info(args.device), "quick": args.quick, "required_ratio": REQUIRED_RATIO,
            "idle_wait": waited, **result}
    write_json(args.out, data)
    return data


if __name__ == "__main__":
    main()
