"""Measured fold gains: the latency that folding each α group saves on the device the model will run on.

The paper's regularizer pushes every site alike, yet sites differ in what their removal buys: folding an early,
high-resolution block removes large intermediate tensors, while folding a late, wide block can cost time (its merged
conv has more MACs than the convs it replaces). ``measure_fold_gains`` folds each α group alone and times it against
the BN-fused model; ``FoldGains.weights`` turns the savings into ``LayerFoldingConfig.regularizer_weights`` so the
search spends its accuracy budget where the target device gains (latency-aware selection, as DepthShrinker and
LayerMerge do with their own cost tables).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch.nn as nn

from .activation import FoldableActivation
from .collate import input_shape
from .files import write_text_atomic
from .fold import fold_model
from .plan import FoldPlan, applied_plan, as_plan, block_names, plan_of
from .prepare import is_prepared
from .timing import check_timing_args


def alpha_groups(model: nn.Module) -> dict[str, list[str]]:
    """α owner → the sites that read that α, in network order (one site per group unless α is shared)."""
    groups: dict[str, list[str]] = {}
    for m in model.modules():
        if isinstance(m, FoldableActivation):
            groups.setdefault(m.alpha_owner, []).append(m.site)
    return groups


@dataclass
class FoldGains:
    """Latency of the BN-fused model and of each α group folded alone, on one device and input shape."""

    device: str
    batch_size: int
    input_size: tuple[int, ...]
    dtype: str
    channels_last: bool
    baseline_ms: float
    groups: dict[str, dict] = field(default_factory=dict)  # owner → {"sites": [...], "ms": folded latency}
    noise_ms: float = 0.0  # half the median gap between two timed copies of the baseline: a floor on the noise
    model: str | None = None  # the architecture measured (its pretrained_cfg's, else its class name)

    def saved_ms(self) -> dict[str, float]:
        """Owner → milliseconds its fold saves (negative: folding it alone makes the model slower)."""
        return {owner: self.baseline_ms - g["ms"] for owner, g in self.groups.items()}

    def weights(self, min_saving: float = 0.0) -> dict[str, float]:
        """Per-site ``regularizer_weights``: a group's saving split over its sites, scaled so the mean weight is 1
        (λ keeps the scale it has with uniform weights). A group saving no more than ``min_saving`` (a fraction
        of the baseline latency, e.g. 0.02 where two identical models time 2 % apart) weighs 0: the search does not
        push it."""
        if not 0 <= min_saving < 1:
            raise ValueError(f"min_saving must lie in [0, 1) (a fraction of the baseline latency), got {min_saving}")
        saved = {o: s if s > min_saving * self.baseline_ms else 0.0 for o, s in self.saved_ms().items()}
        total = sum(saved.values())
        sites = sum(len(g["sites"]) for g in self.groups.values())
        if total <= 0:
            raise ValueError(f"folding no α group alone saves more than {min_saving:.1%} of the "
                             f"{self.baseline_ms:.3f} ms baseline on {self.device}; latency weights would push "
                             "nothing (try another batch size, or no regularizer_weights)")
        return {site: saved[owner] / len(g["sites"]) * sites / total
                for owner, g in self.groups.items() for site in g["sites"]}

    def estimated_speedup(self, sites: FoldPlan | Sequence[str]) -> float:
        """Baseline latency over the latency left once the α groups ``sites`` (site names, or a ``FoldPlan``) cover
        are folded, each group's saving taken as measured alone: a first guess at a plan's speed-up without timing
        it. Savings add where the folded groups merge into separate convs; groups whose folds merge into one conv
        save more together, so the guess errs low there (EfficientNet-Lite0 at batch 128 on an H100: 0-5 % low
        for 18 plans, the stem and first block folded together accounting for most of it). Time the plan before
        relying on it (``benchmarks/bench_plan_ablation.py`` times a plan and its neighbours)."""
        wanted = set(as_plan(sites, "estimated_speedup").linear_sites)
        unknown = wanted - {s for g in self.groups.values() for s in g["sites"]}
        if unknown:
            blocks = block_names(unknown, (s for g in self.groups.values() for s in g["sites"]))
            hint = (f"; {blocks} name blocks: pass FoldPlan.from_blocks(model, names)" if blocks else "")
            raise ValueError(f"sites not in this measurement: {sorted(unknown)}; it has the groups "
                             f"{sorted(self.groups)}{hint}")
        part = {owner: {"given": sorted(wanted & set(g["sites"])), "group": list(g["sites"])}
                for owner, g in self.groups.items() if wanted & set(g["sites"]) and not set(g["sites"]) <= wanted}
        if part:  # e.g. a fused block (one site of two) after a measurement that folded whole blocks
            raise ValueError(f"these sites are part of an α group each, whose saving was measured with all its sites "
                             f"folded: {part}; give every site of the group, or measure with alpha_sharing='site' "
                             "to estimate such a plan")
        saved = sum(s for owner, s in self.saved_ms().items() if wanted & set(self.groups[owner]["sites"]))
        if saved >= self.baseline_ms:
            raise ValueError(f"the groups of these sites save {saved:.3f} ms of a {self.baseline_ms:.3f} ms baseline "
                             "when each is measured alone: more than the whole forward, so their sum cannot estimate "
                             "this plan; time it instead")
        return self.baseline_ms / (self.baseline_ms - saved)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> FoldGains:
        """Also reads the JSON of ``hf-layerfold gains --json`` and a sweep's ``fold_gains`` (extra keys ignored)."""
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in data] if isinstance(data, dict) else required
        if missing:
            raise ValueError(f"not a fold-gains measurement (what measure_fold_gains or `hf-layerfold gains --json` "
                             f"writes): it lacks {missing}")
        gains = cls(**{k: v for k, v in data.items() if k in known} | {"input_size": tuple(data["input_size"])})
        gains._check_values()
        return gains

    def _check_values(self) -> None:
        """Numbers where numbers belong: a file edited by hand failed later, in ``weights()``, with a TypeError."""
        def ms(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
                and value >= 0

        bad = [] if ms(self.baseline_ms) and self.baseline_ms > 0 else [f"baseline_ms={self.baseline_ms!r}"]
        if self.model is not None and not isinstance(self.model, str):
            bad.append(f"model={self.model!r}")
        if not isinstance(self.groups, dict):
            bad.append(f"groups={self.groups!r} (a mapping of α owner to {{'sites': [...], 'ms': ...}})")
        else:
            bad += [f"groups[{owner!r}]" for owner, g in self.groups.items()
                    if not (isinstance(g, dict) and ms(g.get("ms")) and isinstance(g.get("sites"), list)
                            and all(isinstance(s, str) for s in g["sites"]))]
        if bad:
            raise ValueError(f"not a readable fold-gains measurement: {', '.join(bad[:5])}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> FoldGains:
        """Read what ``save`` wrote (or a sweep JSON, whose measurement sits under ``fold_gains``)."""
        try:
            data = json.loads(Path(path).read_text())
            return cls.from_dict(data.get("fold_gains", data) if isinstance(data, dict) else data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        except TypeError as err:  # a field of the wrong type (an int input_size)
            raise ValueError(f"{path}: not a readable fold-gains measurement: {err}") from None

    def save(self, path: str | os.PathLike) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")


def timing_input_size(model: nn.Module, input_size: int | Sequence[int] | None, who: str, why: str,
                      unplanned_why: str, *, batch_size: int = 1, dtype: str = "fp32",
                      rounds: int = 1, warmup: int = 0, round_seconds: float = 1.0) -> tuple[int, ...]:
    """The input size (channels, height, width) to time ``model`` at (default: its pretrained_cfg's; an int or
    (height, width) as ``fold_stats`` takes them), after checking that ``model`` is prepared (``why``: what its
    config decides) and not yet planned (``unplanned_why``), and that the timing arguments are valid."""
    if not is_prepared(model):
        raise ValueError(f"{who} needs a prepared model (hf_layerfold.prepare_model), with the config the search "
                         f"will use: {why}")
    if applied_plan(model) is not None:
        raise ValueError(f"{who} needs a model whose plan is not fixed yet ({unplanned_why})")
    check_timing_args(who, batch_size=batch_size, rounds=rounds, warmup=warmup, round_seconds=round_seconds,
                      dtype=dtype)
    if input_size is None:  # its height and width (timm keeps the 3 channels there for an in_chans=1 model)
        input_size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))[-2:]
    channels = getattr(model, "in_chans", 3)
    try:  # an int side, (height, width) or (channels, height, width), as fold_stats takes them
        shape = input_shape(input_size, channels)
    except ValueError as err:
        raise ValueError(f"{who}: {err}") from None
    if shape[0] != channels:  # (as fold_stats refuses it: else a conv's RuntimeError from inside the timing)
        raise ValueError(f"{who}: input_size {tuple(shape)} has {shape[0]} channel(s) but the model takes {channels}; "
                         "give (height, width) or one side to time at the model's channels")
    return shape


def measure_fold_gains(model: nn.Module, input_size: int | Sequence[int] | None = None, *, batch_size: int = 1,
                       device: str = "cpu", dtype: str = "fp32", channels_last: bool = False, rounds: int = 7,
                       round_seconds: float = 0.25, warmup: int = 3) -> FoldGains:
    """Fold each α group of a prepared (not yet planned) ``model`` alone and time it beside the BN-fused model.

    Latency does not depend on the weights, so a randomly initialised model gives the same gains as a trained one.
    Each group is timed beside two copies of the BN-fused model, in rounds of a fresh random order; its latency is
    the baseline's times the median over rounds of its ratio to the copies in that round (drift of a shared machine
    cancels). The median gap between the copies (``noise_ms``) is a floor on the timing noise: savings below it say
    nothing, and on a shared CPU a repeated measurement can differ by more (one rotation's cache state is not
    another's). The caller's model is not changed.
    """
    from .timing import latency_samples, resolve_device

    input_size = timing_input_size(model, input_size, "measure_fold_gains", "the sites, the α sharing and "
                                   "max_macs_increase decide each fold", "it folds each group alone",
                                   batch_size=batch_size, dtype=dtype, rounds=rounds, warmup=warmup,
                                   round_seconds=round_seconds)
    groups = alpha_groups(model)
    base, twin = fold_model(model, FoldPlan()), fold_model(model, FoldPlan())
    baselines, twin_ratios, ratios = [], [], {}
    for owner, sites in groups.items():  # one small rotation per group: with all of them in one, caches fill
        ms = latency_samples({"": base, " twin": twin, owner: fold_model(model, FoldPlan(tuple(sites)))},
                             input_size, batch_size=batch_size, device=device, dtype=dtype,
                             channels_last=channels_last, warmup=warmup, rounds=rounds,
                             round_seconds=round_seconds, shuffle=True)
        reference = [(a + b) / 2 for a, b in zip(ms[""], ms[" twin"])]
        baselines.append(statistics.median(reference))
        twin_ratios.append(statistics.median(a / b for a, b in zip(ms[""], ms[" twin"])))
        ratios[owner] = statistics.median(t / r for t, r in zip(ms[owner], reference))
    baseline = statistics.median(baselines)
    noise = statistics.median(abs(r - 1) for r in twin_ratios) / 2
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    return FoldGains(device=str(resolve_device(device, timing=True)),  # "auto": the device that was timed
                     batch_size=batch_size, input_size=input_size, dtype=dtype, model=arch,
                     channels_last=channels_last, baseline_ms=baseline, noise_ms=baseline * noise,
                     groups={owner: {"sites": sites, "ms": baseline * ratios[owner]}
                             for owner, sites in groups.items()})


def measure_plan_speedup(model: nn.Module, plan: FoldPlan | Sequence[str],
                         input_size: int | Sequence[int] | None = None, *, batch_size: int = 1,
                         device: str = "cpu", dtype: str = "fp32", channels_last: bool = False, rounds: int = 7,
                         round_seconds: float = 0.25, warmup: int = 3) -> dict[str, float]:
    """What ``plan`` (a :class:`FoldPlan`, or block and site names as :meth:`FoldPlan.from_blocks` reads them)
    would buy on this device, before any training: the prepared (not yet planned) ``model`` folded with it, timed
    beside the BN-fused model in rounds of a fresh random order. Returns ``speedup``, the
    median over rounds of the paired ratio (drift of a shared machine cancels), ``baseline_ms`` (the BN-fused
    model's median) and ``plan_ms`` (the baseline over the speed-up, as ``FoldGains`` reports a group).
    :meth:`FoldGains.estimated_speedup` only sums single groups' savings and errs low where folds merge into one
    conv; a plan meant to reach a speed-up target should be timed."""
    from .plan import check_plan
    from .timing import latency_samples

    input_size = timing_input_size(model, input_size, "measure_plan_speedup", "the sites, the α sharing and "
                                   "max_macs_increase decide the fold", "pass the plan instead",
                                   batch_size=batch_size, dtype=dtype, rounds=rounds, warmup=warmup,
                                   round_seconds=round_seconds)
    plan = plan_of(model, plan, "measure_plan_speedup")  # (block names as FoldPlan.from_blocks reads them)
    check_plan(model, plan)
    ms = latency_samples({"bn_fused": fold_model(model, FoldPlan()), "plan": fold_model(model, plan)}, input_size,
                         batch_size=batch_size, device=device, dtype=dtype, channels_last=channels_last,
                         warmup=warmup, rounds=rounds, round_seconds=round_seconds, shuffle=True)
    baseline = statistics.median(ms["bn_fused"])
    speedup = statistics.median(b / p for b, p in zip(ms["bn_fused"], ms["plan"]))
    return {"baseline_ms": baseline, "plan_ms": baseline / speedup, "speedup": speedup}
