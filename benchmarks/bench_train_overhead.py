"""Training-step cost of the α search: a prepared model (α learned) beside the same timm model without α.

One step = ``zero_grad`` + forward + cross-entropy + backward + AdamW step, in train mode. The variants are
timed side by side in every round, in a fresh random order each round (as ``harness.time_interleaved``: a rotated
fixed order would have each variant follow the same neighbour in most rounds), so drift of a shared machine hits
them alike; the reported ratio is the median over rounds of the per-round ratio. Variants:

* ``timm``: the model as timm builds it (in-place activations), no α.
* ``prepared``: ``prepare_model`` with the default ``blend="auto"``: the Triton kernels on CUDA; on CPU
  ``torch.compile`` with each BatchNorm + blend pair as one compiled region (the blend alone where no BatchNorm
  carries it), the rest of the model eager. Its step also adds the α regularizer to the loss and clamps α after the
  optimizer step, as the trainer does.
* ``prepared_eager``: ``blend="eager"``, what ``"auto"`` falls back to where its fast path cannot run.
* ``prepared_compile_blend`` (CUDA only; on CPU it would differ from ``prepared`` only below the 2^16-element
  threshold of ``"auto"``): ``blend="compile"``.
* ``timm_twin`` (``--aa-control``): a second copy of the timm model, timed like the others. Its ratio to ``timm``
  (``ratio_aa``, ideally 1) is the noise floor of the measurement: a ratio of the prepared model that moves by
  more between calls than the A/A ratio does is the machine, not the α sites.
* ``timm_regional``: the fair twin of the compiled regions: the timm model with its own BatchNorm + activation
  regions compiled the same way (``ratio_prepared_vs_timm_regional`` on CPU,
  ``ratio_prepared_compile_blend_vs_timm_regional`` on CUDA).
* with ``--whole-compile``: ``timm_compiled`` and ``prepared_compiled``, both models under ``torch.compile`` (what
  ``TrainingArguments(torch_compile=True)`` does); their ratio is the α cost for users who compile.
  ``--compile-mode reduce-overhead`` compiles both with CUDA graphs (``torch_compile_mode``), which should take
  the per-site host time out of the step. ``--channel-alpha`` adds ``prepared_compiled_channel_alpha``: the prepared
  model compiled with each α broadcast per channel (:class:`ChannelAlphaSite`), so that inductor can sum α's
  gradient inside the BatchNorm backward's per-channel reductions instead of in a pass of its own.

``python -m benchmarks.bench_train_overhead --out benchmarks/results/train_overhead.json``
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d

import hf_layerfold as lf
from hf_layerfold import triton_blend
from hf_layerfold.losses import alpha_regularizer, clamp_alphas_
from hf_layerfold.prepare import unique_alphas
from hf_layerfold.timing import resolve_device

from .harness import RESULTS_DIR, LoadMeter, device_info, log, paired_ratio, summarize, sync, write_json

MODELS = ("mobilenetv2_100", "tf_efficientnet_lite0")
REQUIRED_RATIO = 1.05


def grad_gap(model: nn.Module, other: nn.Module, x: torch.Tensor) -> float:
    """Largest gradient difference (weights and α) between two copies of a model, relative to the largest
    gradient (parameters whose true gradient is ~0, like a bias before BatchNorm, would make a per-tensor ratio
    pure rounding noise). Computed in float64: in float32, train-mode BatchNorm over a batch of two amplifies mere
    rounding differences to ~1e-3."""
    grads = []
    x = x.double()
    for m in (copy.deepcopy(model).double(), copy.deepcopy(other).double()):
        m.zero_grad(set_to_none=True)
        m.train()
        m(x).float().pow(2).mean().backward()
        grads.append([p.grad for p in m.parameters()])
    pairs = [(a, b) for a, b in zip(*grads) if a is not None]
    scale = max(float(a.abs().max()) for a, _ in pairs)
    return max(float((a - b).abs().max()) for a, b in pairs) / scale


Optim = tuple[torch.optim.Optimizer, list[torch.Tensor]]  # the optimizer and the α it regularizes and clamps


def train_step(model: nn.Module, optim: Optim, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step; for a prepared model with what ``LayerFoldingTrainer`` adds (regularizer, α clamp)."""
    opt, alphas = optim
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if alphas:
        loss = loss + 0.1 * alpha_regularizer(alphas, "l1")
    loss.backward()
    opt.step()
    if alphas:
        clamp_alphas_(alphas)


def make_optimizer(model: nn.Module) -> Optim:
    alphas = {id(a) for a in lf.alpha_parameters(model).values()}
    weights = [p for p in model.parameters() if id(p) not in alphas]
    groups = [{"params": weights, "weight_decay": 0.05}]
    if alphas:
        groups.append({"params": unique_alphas(lf.alpha_parameters(model).values()), "lr": 1e-2, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=1e-3, fused=True)  # what Trainer's default optim, adamw_torch_fused, runs
    return opt, groups[1]["params"] if alphas else []


def time_steps(variants: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, rounds: int, warmup: int,
               budget_s: float) -> dict[str, list[float]]:
    optims = {name: make_optimizer(m) for name, m in variants.items()}
    names = list(variants)
    for name in names:
        variants[name].train()
        for _ in range(warmup):
            train_step(variants[name], optims[name], x, y)
    samples: dict[str, list[float]] = {n: [] for n in names}
    order = random.Random(0)
    start, r = time.perf_counter(), 0
    while r < rounds:
        for name in order.sample(names, len(names)):
            sync(x.device)  # on CUDA: time the step's GPU work, not how fast its kernels were queued
            t0 = time.perf_counter()
            train_step(variants[name], optims[name], x, y)
            sync(x.device)
            samples[name].append((time.perf_counter() - t0) * 1e3)
        r += 1
        if r >= 5 and (time.perf_counter() - start) / r * (r + 1) > budget_s:
            break
    return samples


def prepared_copy(base: nn.Module, blend: str) -> nn.Module:
    return lf.prepare_model(copy.deepcopy(base), lf.LayerFoldingConfig(alpha_init=0.3, blend=blend))


class ChannelAlphaSite(lf.FoldableActivation):
    """A searching site that, under an outer ``torch.compile``, broadcasts α to ``(1, C, 1, 1)``.

    The output is the same. In the backward, autograd then sums ``g·(x − act(x))`` per channel first, over the
    range of the BatchNorm backward's own reductions, and adds the C partial sums afterwards. With a scalar α,
    inductor computes that sum in a kernel of its own and writes the BatchNorm output to memory for it. On a CPU
    (session 20) the per-channel form gave one fused kernel per site, but a slower one; it has not run on a GPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed is None and x.dim() == 4 and torch.compiler.is_compiling():
            alpha = self.alpha.to(x.dtype).reshape(1, 1, 1, 1).expand(1, x.shape[1], 1, 1)
            return torch.lerp(self.act(x), x, alpha)
        return super().forward(x)


def channel_alpha_copy(prepared: nn.Module) -> nn.Module:
    """A copy of a prepared model whose sites are :class:`ChannelAlphaSite` (same parameters and state dict)."""
    model = copy.deepcopy(prepared)
    for m in model.modules():
        if type(m) is lf.FoldableActivation:
            m.__class__ = ChannelAlphaSite
    return model


def run(models: tuple[str, ...], batch: int, size: int, threads: int, rounds: int, warmup: int,
        budget_s: float, device: str, whole_compile: bool = False, compile_variants: bool = True,
        compile_mode: str | None = None, channel_alpha: bool = False, aa_control: bool = False) -> dict:
    torch.set_num_threads(threads)
    rows = []
    for name in models:
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False, num_classes=1000).to(device)
        variants = {"timm": base, "prepared": prepared_copy(base, "auto"),
                    "prepared_eager": prepared_copy(base, "eager")}
        if aa_control:
            variants["timm_twin"] = copy.deepcopy(base)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        compile_s = {}
        t0 = time.perf_counter()  # the default path against the eager blend; on CPU the first call compiles, so
        # compile_s["auto"] = that check (float64, both models) + one float32 step: compiling plus a little running
        checks = {"auto_vs_eager_grad_rel_err": grad_gap(variants["prepared"], variants["prepared_eager"], x[:2])}
        train_step(variants["prepared"], make_optimizer(variants["prepared"]), x, y)  # and the float32 graphs
        if device == "cpu":
            compile_s["auto"] = round(time.perf_counter() - t0, 1)
        if compile_variants and device != "cpu":
            compiled_blend = variants["prepared_compile_blend"] = prepared_copy(base, "compile")
            t0 = time.perf_counter()
            checks["compile_blend_grad_rel_err"] = grad_gap(variants["prepared"], compiled_blend, x[:2])
            compile_s["blend"] = round(time.perf_counter() - t0, 1)  # the first call compiles
        if compile_variants:
            regional = copy.deepcopy(base)  # the fair twin of blend="compile": timm's BatchNorm+act regions compiled
            for m in regional.modules():
                if isinstance(m, BatchNormAct2d):
                    m.compile(dynamic=True)
            t0 = time.perf_counter()
            train_step(regional, make_optimizer(regional), x, y)
            compile_s["timm_regional"] = round(time.perf_counter() - t0, 1)
            variants["timm_regional"] = regional
        if whole_compile:
            compiled = {"timm_compiled": copy.deepcopy(base), "prepared_compiled": copy.deepcopy(variants["prepared"])}
            if channel_alpha:
                compiled["prepared_compiled_channel_alpha"] = channel_alpha_copy(variants["prepared"])
            for key, model in compiled.items():
                variants[key] = torch.compile(model, mode=compile_mode)
                t0 = time.perf_counter()
                train_step(variants[key], make_optimizer(variants[key]), x, y)
                compile_s[key] = round(time.perf_counter() - t0, 1)
        log(f"[train_overhead] {name}: batch {batch} at {size}px, {threads} threads, compile {compile_s}")
        with LoadMeter() as meter:
            samples = time_steps(variants, x, y, rounds, warmup, budget_s)
        stats = {k: summarize(v) for k, v in samples.items()}
        row = {"model": name, "batch": batch, "input_size": size, "threads": threads,
               **({"compile_mode": compile_mode} if whole_compile and compile_mode else {}),
               "sites": len(lf.alpha_parameters(variants["prepared"])), "rounds": len(samples["timm"]),
               **{f"{k}_ms": v["median_ms"] for k, v in stats.items()}}
        pairs = [("prepared", "timm"), ("prepared_eager", "timm"), ("prepared_compile_blend", "timm"),
                 ("prepared_compile_blend" if device != "cpu" else "prepared", "timm_regional"),
                 ("prepared_compiled", "timm_compiled"), ("prepared_compiled_channel_alpha", "timm_compiled")]
        for variant, reference in pairs:
            if variant in samples and reference in samples:
                key = variant if reference in ("timm", "timm_compiled") else f"{variant}_vs_{reference}"
                row[f"ratio_{key}"] = round(paired_ratio(samples[variant], samples[reference]), 4)
                row[f"ratio_min_{key}"] = round(stats[variant]["min_ms"] / stats[reference]["min_ms"], 4)
        if "timm_twin" in samples:  # A/A: the noise floor, not a requirement
            row["ratio_aa"] = round(paired_ratio(samples["timm_twin"], samples["timm"]), 4)
        row.update({**checks, "compile_s": compile_s, "direct_launch": triton_blend.direct_launch_state(),
                    "others_cores": meter.result.get("other_processes_cores"), "loadavg": meter.result.get("loadavg")})
        row["within_required"] = {k[len("ratio_"):]: v <= REQUIRED_RATIO for k, v in row.items()
                                  if k.startswith("ratio_") and not k.startswith("ratio_min_") and k != "ratio_aa"}
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
    parser.add_argument("--whole-compile", action="store_true",
                        help="also time both models under torch.compile (slow to compile on CPU)")
    parser.add_argument("--compile-mode", default=None,
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode of the --whole-compile variants (reduce-overhead: CUDA graphs)")
    parser.add_argument("--channel-alpha", action="store_true",
                        help="with --whole-compile, also the prepared model compiled with α broadcast per channel")
    parser.add_argument("--no-compile-variants", action="store_true",
                        help="skip blend='compile' and its compiled timm twin (they compile for a minute or more)")
    parser.add_argument("--aa-control", action="store_true",
                        help="also time a second copy of the timm model: its ratio (ratio_aa) is the noise floor")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="first wait up to this many seconds for other processes to go quiet")
    args = parser.parse_args(argv)
    try:  # before building models: without a GPU, torch fails later with a driver traceback
        resolve_device(args.device, timing=True)
    except (RuntimeError, ValueError) as err:
        parser.error(str(err))
    if (args.compile_mode or args.channel_alpha) and not args.whole_compile:
        parser.error("--compile-mode and --channel-alpha apply to the --whole-compile variants: add --whole-compile")
    waited = None
    if args.wait_idle > 0:
        from .run import wait_for_idle

        waited = wait_for_idle(args.wait_idle)
    models = ("mobilenetv2_050",) if args.quick else tuple(args.models.split(","))
    size, rounds = (64, 6) if args.quick else (args.input_size, args.rounds)
    thread_counts = [int(t) for t in str(args.threads).split(",")]
    rows: list[dict] = []
    data: dict = {}
    for i, threads in enumerate(thread_counts):
        for model in models:  # the JSON is rewritten after every row: a time-boxed call keeps what it measured
            rows += run((model,), args.batch, size, threads, rounds, args.warmup, args.budget_s, args.device,
                        args.whole_compile, not args.no_compile_variants, args.compile_mode,
                        args.channel_alpha, args.aa_control)["rows"]
            last = i == len(thread_counts) - 1 and model == models[-1]
            data = _result(args, rows, thread_counts, waited, complete=last)
            write_json(args.out, data)
    return data


def _result(args: argparse.Namespace, rows: list[dict], thread_counts: list[int], waited: dict | None,
            complete: bool) -> dict:
    # every thread count of the rows (the device line of a table must not name only the last one)
    device = {**device_info(args.device), "torch_threads": thread_counts[0] if len(thread_counts) == 1
              else thread_counts}
    result = {"rows": rows} if complete else {"rows": rows, "complete": False}
    return {"benchmark": "train_overhead", "title": "Training overhead of the α search",
            "description": ("Median training-step time (fwd + bwd + AdamW step) of a prepared model in the search "
                            "phase vs the same timm model without α; ratio = median of per-round ratios "
                            "(interleaved); prepared uses the default blend='auto' (Triton on CUDA, torch.compile "
                            "regions on CPU); prepared_compile_blend uses blend='compile'; prepared_compiled compares "
                            "two models under torch.compile (prepared_compiled_channel_alpha: α broadcast per "
                            f"channel). Required: ratio ≤ {REQUIRED_RATIO}."),
            "device": device, "quick": args.quick, "required_ratio": REQUIRED_RATIO,
            "idle_wait": waited, **result}


if __name__ == "__main__":
    main()
