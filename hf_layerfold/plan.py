"""``FoldPlan`` (which sites become linear) and ``apply_plan``: fix α and make the model exactly foldable."""

from __future__ import annotations

import copy
import json
import logging
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from .activation import FoldableActivation, recorded_phases
from .config import LayerFoldingConfig, as_config
from .files import write_text_atomic
from .fold_math import composed_groups
from .graph import WRAPPER_ATTRS, ActNode, ConvNode, ResidualNode, build_graph
from .layers import PaddedConv2d
from .padding import PadRule, effective_kernel, pad_rule_of, static_chain_padding

PLAN_NAME = "layerfold_plan.json"

logger = logging.getLogger(__name__)


def past_threshold(alpha: torch.Tensor, threshold: float) -> torch.Tensor:
    """Whether α reached ``threshold``, as the plan and the trainer's ``sites_past_threshold`` log both decide it:
    in float32, with the threshold rounded to float32 (``float(α)`` of a float32 α equal to float32(0.9) is
    0.89999998 < 0.9; a bf16 α compared in bf16 would pass 0.8984375 as 0.9). Elementwise for a stacked tensor."""
    return alpha.detach().float() >= threshold


def _own_config(model: nn.Module) -> LayerFoldingConfig:
    """The ``layerfold_config`` of ``model``, or of the model a wrapper (DDP, torch.compile, TimmWrapper) holds."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        config = getattr(model, "layerfold_config", None)
        if config is not None:
            return config
        inner = next((getattr(model, a) for a in WRAPPER_ATTRS if isinstance(getattr(model, a, None), nn.Module)),
                     None)
        if inner is None:
            break
        model = inner
    return LayerFoldingConfig()


def threshold_plan(model: nn.Module, who: str) -> FoldPlan:
    """The threshold plan of a searching model, which ``who`` folds for lack of a fixed one; a warning when it
    rounds some α (strictly between 0 and 1) to 0/1, so that the fold computes another network than the model."""
    plan = FoldPlan.from_model(model)
    linear = set(plan.linear_sites)
    rounded = sorted(m.site for m in model.modules() if isinstance(m, FoldableActivation)
                     and float(m.alpha.detach()) != (1.0 if m.site in linear else 0.0))
    if rounded:
        logger.warning("%s: the model is still searching, and its threshold plan rounds the α of %d site(s) to 0/1 "
                       "(%s%s): the folded net computes the planned network, not this model; apply_plan and "
                       "fine-tune first for a fold that matches what was trained", who, len(rounded),
                       ", ".join(rounded[:3]), ", ..." if len(rounded) > 3 else "")
    return plan


@dataclass(frozen=True)
class FoldPlan:
    """The set of activation sites to make linear (the identity); every other site keeps its activation."""

    linear_sites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.linear_sites, str):  # FoldPlan("bn1.act") would become a plan of its characters
            raise TypeError(f"FoldPlan takes a sequence of site names, got the string {self.linear_sites!r}; "
                            f"write FoldPlan([{self.linear_sites!r}])")
        try:
            sites = list(self.linear_sites)
        except TypeError:
            sites = None
        if sites is None or not all(isinstance(s, str) for s in sites):
            raise TypeError(f"FoldPlan takes a sequence of site names (strings), got {self.linear_sites!r}")
        object.__setattr__(self, "linear_sites", tuple(sorted(set(sites))))

    @classmethod
    def from_model(cls, model: nn.Module, threshold: float | None = None) -> FoldPlan:
        """Sites whose learned α reached ``threshold`` (default: the model's config threshold; through a DDP /
        ``torch.compile`` / TimmWrapper wrapper, the wrapped model's)."""
        if threshold is None:
            threshold = _own_config(model).threshold
        elif isinstance(threshold, torch.Tensor) and threshold.numel() == 1:  # e.g. torch.quantile of the α
            threshold = float(threshold)
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or threshold != threshold:
            raise TypeError(f"FoldPlan.from_model: threshold must be a number (or None for the model's config "
                            f"threshold), got {threshold!r}")
        if not 0.0 < threshold <= 1.0:  # as LayerFoldingConfig.threshold: 90 (a percentage) planned nothing, 0 all
            raise ValueError(f"FoldPlan.from_model: threshold must lie in (0, 1] (α is kept in [0, 1]), got "
                             f"{threshold!r}")
        return cls(tuple(m.site for m in model.modules()
                         if isinstance(m, FoldableActivation) and bool(past_threshold(m.alpha, threshold))))

    @classmethod
    def from_blocks(cls, model: nn.Module, blocks: list[str]) -> FoldPlan:
        """Every foldable site inside the named blocks (e.g. ``["blocks.1.1", "blocks.4.0"]``). A name may also be
        one site (``"blocks.1.0.bn1.act"``): the expand activation of an inverted residual alone turns the block
        into a fused one (expand and depthwise merge into one dense conv) while it keeps a non-linearity."""
        from .prepare import foldable_sites, site_blocks

        if isinstance(blocks, str):
            raise TypeError(f"from_blocks takes a list of block or site names, got the string {blocks!r}")
        if isinstance(blocks, FoldPlan):  # (a FoldPlan of block names, as written by hand)
            blocks = list(blocks.linear_sites)
        sites = foldable_sites(model)
        chosen, missing = [], []
        for block in blocks:
            inside = [s for s in sites if s == block or s.startswith(block + ".")]
            (chosen.extend(inside) if inside else missing.append(block))
        if missing:
            known = list(site_blocks(model))
            single = next((s for s in sites if s not in known), sites[0])
            raise ValueError(f"no foldable site inside block(s) {missing}, nor a foldable site of that name; the "
                             f"model's blocks are {', '.join(known[:8])}{', ...' if len(known) > 8 else ''} "
                             f"({len(known)} in all); a single site is named like {single!r}")
        return cls(tuple(chosen))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping) -> FoldPlan | None:
        """The plan a planned model's state dict records (each site's ``_extra_state``), or ``None`` for the state
        dict of a searching model: apply it before loading such weights (``load_state_dict`` refuses them into a
        model without that plan)."""
        phases = recorded_phases(state_dict)
        while phases:  # the state dict of a wrapped model (DDP, torch.compile, TimmWrapper), in any nesting
            wrapper = next((w for w in (f"{a}." for a in WRAPPER_ATTRS) if all(s.startswith(w) for s in phases)), None)
            if wrapper is None:
                break
            phases = {site[len(wrapper):]: phase for site, phase in phases.items()}
        if not phases or set(phases.values()) == {None}:
            return None
        if None in phases.values():
            raise ValueError("the state dict mixes searching and planned sites; it is not one model's")
        return cls(tuple(site for site, phase in phases.items() if phase == "linear"))

    def __len__(self) -> int:
        return len(self.linear_sites)

    def to_dict(self) -> dict:
        return {"linear_sites": list(self.linear_sites)}

    @classmethod
    def from_dict(cls, data: dict) -> FoldPlan:
        if not isinstance(data, dict):
            raise ValueError(f"a FoldPlan is a JSON object {{\"linear_sites\": [site names]}}, got {data!r}")
        unknown = set(data) - {"linear_sites"}
        if unknown:
            raise ValueError(f"unknown FoldPlan field(s) {sorted(unknown)}; known: ['linear_sites']")
        sites = data.get("linear_sites", ())
        if not isinstance(sites, list | tuple) or not all(isinstance(s, str) for s in sites):
            raise ValueError(f"FoldPlan linear_sites must be a list of site names, got {sites!r}")
        return cls(tuple(sites))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan to ``path``: a JSON file, or ``layerfold_plan.json`` inside a folder (one that exists, or
        a path ending in a separator); returns the file written."""
        folder = str(path).endswith(("/", os.sep))
        path = Path(path)
        if folder or path.is_dir():
            path = path / PLAN_NAME
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> FoldPlan:
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_NAME
        try:
            data = json.loads(path.read_text())
        except ValueError as err:  # (UnicodeDecodeError and JSONDecodeError both are)
            raise ValueError(f"{path} is not a valid FoldPlan JSON file: {err}") from None
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------------------------------------
# Segmentation: which convs merge into one. Shared by apply_plan (to move padding) and fold_model (to merge).


@dataclass
class Run:
    """Consecutive convs joined by linear sites; they merge into one conv."""

    convs: list[ConvNode]


@dataclass
class ResidualItem:
    node: ResidualNode
    branch: list
    shortcut: list | None
    absorbed: bool = False  # the whole block becomes one conv


@dataclass
class Segmentation:
    items: list
    pre_logits: list = field(default_factory=list)


def _conv(model: nn.Module, node: ConvNode) -> nn.Conv2d:
    return model.get_submodule(node.conv)


def run_pad_rules(model: nn.Module, run: Run) -> list[PadRule]:
    """Padding rules of the run's convs as they were before any padding was moved."""
    first = _conv(model, run.convs[0])
    if isinstance(first, PaddedConv2d):
        return first.pad_rules
    return [pad_rule_of(_conv(model, c)) for c in run.convs]


def run_kernel_stride(model: nn.Module, run: Run) -> tuple[tuple[int, int], tuple[int, int]]:
    kh = kw = 1
    sh = sw = 1
    for node in run.convs:
        conv = _conv(model, node)
        k = effective_kernel(conv)
        kh, kw = kh + sh * (k[0] - 1), kw + sw * (k[1] - 1)
        sh, sw = sh * conv.stride[0], sw * conv.stride[1]
    return (kh, kw), (sh, sw)


def _split_run(model: nn.Module, convs: list[ConvNode], config: LayerFoldingConfig) -> list[Run]:
    """Split a run so no merged kernel exceeds ``max_kernel_size`` (and, if set, no merge adds too much compute).

    Without a compute limit or measured costs the split is greedy, left to right. With ``max_macs_increase`` it is
    the partition into the fewest convs (then the fewest MACs), with ``merge_costs`` the one of least summed
    measured latency (then the fewest convs), both found by dynamic programming over the run.
    """
    if config.merge_costs is not None:
        return _partition(convs, lambda start, end: _measured_cost(model, convs, start, end, config))
    if config.max_macs_increase is None:
        runs: list[Run] = []
        for node in convs:
            if runs:
                trial = Run(runs[-1].convs + [node])
                if max(run_kernel_stride(model, trial)[0]) <= config.max_kernel_size:
                    runs[-1] = trial
                    continue
            runs.append(Run([node]))
        return runs

    def fewest_convs(start: int, end: int) -> tuple[int, float] | None:
        macs = _merge_cost(model, convs, start, end, config)
        return None if macs is None else (1, macs)

    return _partition(convs, fewest_convs)


def _partition(convs: list[ConvNode], cost: Callable[[int, int], tuple | None]) -> list[Run]:
    """The split of ``convs`` into consecutive pieces whose summed ``cost(start, end)`` (a tuple, compared in order;
    ``None``: that piece is not allowed) is least; ``cost`` must allow every single conv."""
    n = len(convs)
    best: list[tuple | None] = [((0, 0.0), 0)] + [None] * n  # (summed cost, start of the last piece)
    for end in range(1, n + 1):
        for start in range(end):
            if best[start] is None:
                continue
            piece = cost(start, end)
            if piece is None:
                continue
            total = tuple(a + b for a, b in zip(best[start][0], piece))
            if best[end] is None or total < best[end][0]:
                best[end] = (total, start)
    if best[n] is None:
        raise ValueError(f"the run {convs[0].conv} … {convs[-1].conv} cannot be split into allowed pieces")
    runs, end = [], n
    while end > 0:
        start = best[end][1]
        runs.append(Run(convs[start:end]))
        end = start
    return runs[::-1]


def span_key(first: str, last: str) -> str:
    """The ``merge_costs`` key of the convs ``first`` … ``last`` merged (one conv: its own name)."""
    return first if first == last else f"{first}>{last}"


def _measured_cost(model: nn.Module, convs: list[ConvNode], start: int, end: int,
                   config: LayerFoldingConfig) -> tuple[float, int] | None:
    """(measured ms, 1) of ``convs[start:end]`` merged; None where the merge is not allowed or was not measured."""
    key = span_key(convs[start].conv, convs[end - 1].conv)
    if end - start == 1:
        if key not in config.merge_costs:
            raise ValueError(f"merge_costs has no entry for conv {key!r}: they were measured for another model or "
                             "config; measure them again with hf_layerfold.measure_merge_costs")
        return config.merge_costs[key], 1
    if key not in config.merge_costs:
        return None
    if max(run_kernel_stride(model, Run(convs[start:end]))[0]) > config.max_kernel_size:
        return None
    if config.max_macs_increase is not None and _merge_cost(model, convs, start, end, config) is None:
        return None
    return config.merge_costs[key], 1


def merged_shape(model: nn.Module, convs: list[ConvNode]) -> dict:
    """The conv that ``convs`` merge into: channels, groups, kernel and stride (what its latency depends on)."""
    mods = [_conv(model, c) for c in convs]
    groups = mods[0].groups
    for conv in mods[1:]:
        mid = conv.in_channels
        groups = composed_groups(mid, mods[0].in_channels // groups, groups, conv.out_channels,
                                 conv.in_channels // conv.groups, conv.groups)
    kernel, stride = run_kernel_stride(model, Run(list(convs)))
    return {"in_channels": mods[0].in_channels, "out_channels": mods[-1].out_channels, "groups": groups,
            "kernel_size": kernel, "stride": stride}


def _merge_cost(model: nn.Module, convs: list[ConvNode], start: int, end: int,
                config: LayerFoldingConfig) -> float | None:
    """MACs (per input pixel of the whole run) of ``convs[start:end]`` merged, or None if the merge is not allowed."""
    mods = [_conv(model, c) for c in convs]
    scale = 1.0
    for conv in mods[:start]:
        scale /= conv.stride[0] * conv.stride[1]
    parts = 0.0
    for conv in mods[start:end]:
        scale /= conv.stride[0] * conv.stride[1]
        kh, kw = effective_kernel(conv)
        parts += scale * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw  # (not ⌊scale·…⌋)
    if end - start == 1:  # a conv alone is no merge: always allowed, whatever its kernel (a 7×7 stem, dilation)
        return parts
    shape = merged_shape(model, convs[start:end])
    kh, kw = shape["kernel_size"]
    if max(kh, kw) > config.max_kernel_size:
        return None
    merged = scale * shape["out_channels"] * (shape["in_channels"] // shape["groups"]) * kh * kw
    return merged if merged <= (1.0 + config.max_macs_increase) * parts else None


def _segment(model: nn.Module, nodes: list, linear: set[str], config: LayerFoldingConfig) -> list:
    items: list = []
    pending: list[ConvNode] = []
    joined = False

    def flush() -> None:
        nonlocal pending
        if pending:
            items.extend(_split_run(model, pending, config))
        pending = []

    for node in nodes:
        if isinstance(node, ConvNode):
            if not joined:
                flush()
            pending.append(node)
            joined = False
            continue
        if isinstance(node, ActNode) and node.path in linear:
            joined = bool(pending)  # a linear site is the identity; it joins the convs around it
            continue
        flush()
        joined = False
        if isinstance(node, ResidualNode):
            branch = _segment(model, node.branch, linear, config)
            shortcut = None if node.shortcut is None else _segment(model, node.shortcut, linear, config)
            item = ResidualItem(node, branch, shortcut)
            item.absorbed = config.fold_residual and _absorbable(model, item)
            items.append(item)
        else:
            items.append(node)
    flush()
    return items


def _absorbable(model: nn.Module, item: ResidualItem) -> bool:
    """A residual folds into one conv when its branch is one run and its shortcut is identity or one run."""
    if len(item.branch) != 1 or not isinstance(item.branch[0], Run):
        return False
    branch = item.branch[0]
    pads = static_chain_padding(run_pad_rules(model, branch))
    if pads is None:
        return False
    kernel, stride = run_kernel_stride(model, branch)
    first, last = _conv(model, branch.convs[0]), _conv(model, branch.convs[-1])
    if item.shortcut is None:
        return stride == (1, 1) and first.in_channels == last.out_channels
    if len(item.shortcut) != 1 or not isinstance(item.shortcut[0], Run):
        return False
    sc = item.shortcut[0]
    sc_pads = static_chain_padding(run_pad_rules(model, sc))
    sc_kernel, sc_stride = run_kernel_stride(model, sc)
    if sc_pads is None or sc_stride != stride:
        return False
    dy, dx = pads[2] - sc_pads[2], pads[0] - sc_pads[0]
    return dy >= 0 and dx >= 0 and dy + sc_kernel[0] <= kernel[0] and dx + sc_kernel[1] <= kernel[1]


def segment_model(model: nn.Module, plan: FoldPlan, config: LayerFoldingConfig | None = None) -> Segmentation:
    """Split the model's graph into runs of convs that merge, given the linear sites of ``plan``."""
    config = config or getattr(model, "layerfold_applied_config", None) or getattr(model, "layerfold_config", None) \
        or LayerFoldingConfig()
    graph = build_graph(model)
    linear = set(plan.linear_sites)
    return Segmentation(_segment(model, graph.features, linear, config),
                        _segment(model, graph.pre_logits, linear, config))


def iter_runs(items: list):
    for item in items:
        if isinstance(item, Run):
            yield item
        elif isinstance(item, ResidualItem):
            yield from iter_runs(item.branch)
            if item.shortcut is not None:
                yield from iter_runs(item.shortcut)


def iter_kept(items: list):
    """The items a fold keeps as they are (pools, SE modules, activations left non-linear, ...)."""
    for item in items:
        if isinstance(item, ResidualItem):
            yield from iter_kept(item.branch)
            if item.shortcut is not None:
                yield from iter_kept(item.shortcut)
        elif not isinstance(item, Run):
            yield item


# ---------------------------------------------------------------------------------------------------------


def as_plan(plan: FoldPlan | Sequence[str], who: str) -> FoldPlan:
    """A ``FoldPlan``, or site names made into one; a bare string (it would be read as its characters) refused."""
    if isinstance(plan, FoldPlan):
        return plan
    if isinstance(plan, str) or not isinstance(plan, Iterable):
        got = f"the string {plan!r}" if isinstance(plan, str) else repr(plan)
        raise TypeError(f"{who} takes a FoldPlan or a list of site names, got {got}")
    return FoldPlan(tuple(plan))


def plan_of(model: nn.Module, plan: FoldPlan | Sequence[str], who: str) -> FoldPlan:
    """:func:`as_plan`, where a list naming blocks (not only sites) of ``model`` is read as
    :meth:`FoldPlan.from_blocks` reads it, as ``prepare_with_plan`` and ``--plan`` do. A ``FoldPlan`` is taken as it
    is: its names are sites."""
    if isinstance(plan, FoldPlan):
        return plan
    names = as_plan(plan, who).linear_sites
    from .prepare import foldable_sites

    sites = set(foldable_sites(model))
    if all(name in sites for name in names):
        return FoldPlan(names)
    return FoldPlan.from_blocks(model, list(names))


def block_names(names: Iterable[str], sites: Iterable[str]) -> list[str]:
    """Those of ``names`` that name a block holding some of ``sites`` (given where sites were expected)."""
    sites = list(sites)
    return sorted(name for name in names if any(site.startswith(name + ".") for site in sites))


def require_unfolded(model: object, who: str) -> None:
    """A module that is not yet folded; a folded net (nothing left to plan or fold) named as such."""
    from .folded_net import LayerFoldedNet
    from .prepare import require_module

    require_module(model, who)
    if isinstance(model, LayerFoldedNet):
        raise ValueError(f"{who}: the model is already folded (a LayerFoldedNet); it takes the prepared or planned "
                         "network the fold came from")


FOLD_FIELDS = ("max_kernel_size", "max_macs_increase", "merge_costs", "fold_residual")  # how runs merge


def follow_applied_config(model: nn.Module, config: LayerFoldingConfig, who: str,
                          consequence: str = "the model is folded as its plan was applied, and the config follows it"
                          ) -> LayerFoldingConfig:
    """``config`` with the fold fields (:data:`FOLD_FIELDS`) of the config ``model``'s plan was applied with: its
    padding was moved for those runs, so its folds follow them whatever another config says (a warning names
    the fields that differed)."""
    applied = getattr(model, "layerfold_applied_config", None)
    differ = [] if applied is None else [f for f in FOLD_FIELDS if getattr(config, f) != getattr(applied, f)]
    if not differ:
        return config
    values = ", ".join(f"{f}={getattr(applied, f)!r}" for f in differ if f != "merge_costs")
    logger.warning("%s: the model's plan was applied with other %s%s; %s", who, ", ".join(differ),
                   f" ({values})" if values else "", consequence)
    return with_fold_fields(config, applied)


def with_fold_fields(config: LayerFoldingConfig, source: LayerFoldingConfig) -> LayerFoldingConfig:
    """``config`` with ``source``'s :data:`FOLD_FIELDS` (itself when they agree)."""
    if all(getattr(config, f) == getattr(source, f) for f in FOLD_FIELDS):
        return config
    return replace(config, **{f: getattr(source, f) for f in FOLD_FIELDS})


def applied_plan(model: nn.Module) -> FoldPlan | None:
    return getattr(model, "layerfold_plan", None)


def check_plan(model: nn.Module, plan: FoldPlan) -> None:
    """Raise unless ``plan`` names only foldable sites of ``model`` and takes every site sharing an α or none."""
    from .prepare import foldable_sites

    sites = set(foldable_sites(model))
    unknown = sorted(set(plan.linear_sites) - sites)
    if unknown:
        blocks = block_names(unknown, sites)
        from .prepare import is_prepared

        hint = (f"; {blocks} name blocks: pass FoldPlan.from_blocks(model, names) to take every site inside them"
                + ("" if is_prepared(model) else ", or give prepare_with_plan the names as a list, not a FoldPlan")
                ) if blocks else ""
        raise ValueError(f"plan names site(s) that are not foldable in this model: {unknown}; "
                         f"foldable sites: {sorted(sites)}{hint}")
    linear = set(plan.linear_sites)
    groups: dict[str, set[bool]] = {}
    for m in model.modules():
        if isinstance(m, FoldableActivation):
            groups.setdefault(m.alpha_owner, set()).add(m.site in linear)
    split = sorted(owner for owner, decisions in groups.items() if len(decisions) > 1)
    if split:
        raise ValueError(f"the plan makes only some of the sites that share one α linear (α of {split}); with "
                         "alpha_sharing='block' a plan takes whole blocks (FoldPlan.from_blocks, or from_model)")


def apply_plan(model: nn.Module, plan: FoldPlan | Sequence[str],
               config: LayerFoldingConfig | Mapping | None = None) -> nn.Module:
    """Fix the plan (a ``FoldPlan``, or block and site names as :meth:`FoldPlan.from_blocks` reads them) in a
    prepared model (in place): α = 1 on plan sites, 0 elsewhere, all frozen.

    Each run of convs that will merge gets its zero padding moved to its first conv, so that the planned
    model and the folded model compute the same function everywhere, image borders included. Parameters
    keep their identity (an optimizer built earlier keeps working). ``config`` (default: the model's) decides how
    runs merge; its fold fields (:data:`FOLD_FIELDS`) become those of ``model.layerfold_config``.
    """
    from .prepare import is_prepared

    require_unfolded(model, "apply_plan")
    if not isinstance(plan, FoldPlan):  # (a bare string refused before anything else; a generator read once)
        plan = list(as_plan(plan, "apply_plan").linear_sites)
    if not is_prepared(model):
        raise ValueError("apply_plan needs a prepared model: call hf_layerfold.prepare_model(model, config) first")
    plan = plan_of(model, plan, "apply_plan")  # (block names as from_blocks reads them)
    current = applied_plan(model)
    if current is not None:
        if current == plan:
            if config is not None:  # (warns when its fold fields differ)
                follow_applied_config(model, as_config(config), "apply_plan (the plan is applied already)",
                                      "the config given is ignored: apply the plan to a fresh copy of the prepared "
                                      "model to fold it with this config")
            return model
        raise ValueError("a different plan is already applied to this model; apply plans to a fresh copy")
    check_plan(model, plan)
    linear = set(plan.linear_sites)
    config = as_config(config) if config is not None else getattr(model, "layerfold_config", None) or \
        LayerFoldingConfig()
    from .merge_costs import check_merge_costs  # (a table lacking merges would silently stop them, as in prepare_model)

    check_merge_costs(model, config)
    seg = segment_model(model, plan, config)
    for run in list(iter_runs(seg.items)) + list(iter_runs(seg.pre_logits)):
        if len(run.convs) < 2:
            continue
        rules = run_pad_rules(model, run)
        for i, node in enumerate(run.convs):
            conv = _conv(model, node)
            model.set_submodule(node.conv, PaddedConv2d.from_conv(conv, rules if i == 0 else []))
    for m in model.modules():
        if isinstance(m, FoldableActivation):
            m.fix(m.site in linear)
    model.layerfold_plan = plan
    model.layerfold_applied_config = copy.deepcopy(config)  # folding must segment exactly as padding was moved
    own = getattr(model, "layerfold_config", None)
    if own is not None:
        model.layerfold_config = with_fold_fields(own, config)  # what a save records
    return model


def prepare_with_plan(model: nn.Module, plan: FoldPlan | Sequence[str],
                      config: LayerFoldingConfig | Mapping | None = None) -> nn.Module:
    """Prepare ``model`` and fix ``plan`` in it (in place), to fine-tune a plan chosen beforehand: no α search.

    ``plan`` is a :class:`FoldPlan` or block and site names (:meth:`FoldPlan.from_blocks`). Every site gets its own
    α whatever ``config.alpha_sharing`` says: α is frozen at 0 or 1 from the first step, so sharing would change
    nothing in training, and a plan may then take one site of a block (a fused block). The plan is checked before
    the model changes. The config the model was prepared with, and the trainer should use, is
    ``model.layerfold_config``.
    """
    from .prepare import is_prepared, prepare_model, select_sites

    require_unfolded(model, "prepare_with_plan")
    if is_prepared(model):
        raise ValueError("the model is already prepared: fix a plan in it with apply_plan(model, plan)")
    config = replace(as_config(config), alpha_sharing="site")
    selected = set(select_sites(model, config))  # an unsupported model, or a config that selects no site, first
    if not isinstance(plan, FoldPlan):
        plan = FoldPlan.from_blocks(model, plan)
    check_plan(model, plan)
    left_out = sorted(set(plan.linear_sites) - selected)
    if left_out:
        raise ValueError(f"the plan names site(s) that target_modules / exclude_modules leave out: {left_out}")
    prepare_model(model, config)
    return apply_plan(model, plan, config)
