"""``fold_stats``: what folding buys, counted the same way for prepared, planned and folded models.

* ``nonlinear_layers``: activations on the main path that are still non-linear (SE gates not counted).
* ``depth``: conv layers on the longest input→output path (SE gate convs not counted).
* ``convs``, ``params``, ``macs`` (multiply-accumulates of one image at ``input_size``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .activation import FoldableActivation
from .collate import input_shape
from .folded_net import LayerFoldedNet
from .graph import ActNode, ConvNode, ResidualNode, build_graph
from .plan import FoldPlan, ResidualItem, Run, check_plan, plan_of, require_unfolded, segment_model


@dataclass
class FoldStats:
    nonlinear_layers: int
    depth: int
    convs: int
    params: int | None  # None where not counted (projected_stats folds nothing)
    macs: int | None = None
    # the (C, H, W) MACs were counted at (None: not counted); not part of the record, nor of equality
    input_size: tuple[int, int, int] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "input_size"}


def _graph_counts(model: nn.Module, nodes: list) -> tuple[int, int, int]:
    """(non-linear activations, depth, convs) of a node list of a timm model."""
    nonlinear = depth = convs = 0
    for node in nodes:
        if isinstance(node, ConvNode):
            depth, convs = depth + 1, convs + 1
        elif isinstance(node, ActNode):
            act = model.get_submodule(node.path)
            linear = isinstance(act, FoldableActivation) and (act.is_linear or float(act.alpha.detach()) == 1.0)
            nonlinear += not linear
        elif isinstance(node, ResidualNode):
            bn, bd, bc = _graph_counts(model, node.branch)
            sn, sd, sc = _graph_counts(model, node.shortcut or [])
            nonlinear, depth, convs = nonlinear + bn + sn, depth + max(bd, sd), convs + bc + sc
    return nonlinear, depth, convs


def _spec_counts(specs: list[dict]) -> tuple[int, int, int]:
    nonlinear = depth = convs = 0
    for spec in specs:
        if spec["type"] == "conv":
            depth, convs = depth + 1, convs + 1
        elif spec["type"] == "act":
            nonlinear += 1
        elif spec["type"] == "residual":
            bn, bd, bc = _spec_counts(spec["branch"])
            sn, sd, sc = _spec_counts(spec.get("shortcut") or [])
            nonlinear, depth, convs = nonlinear + bn + sn, depth + max(bd, sd), convs + bc + sc
    return nonlinear, depth, convs


def _segment_counts(items: list) -> tuple[int, int, int]:
    nonlinear = depth = convs = 0
    for item in items:
        if isinstance(item, Run) or (isinstance(item, ResidualItem) and item.absorbed):
            depth, convs = depth + 1, convs + 1
        elif isinstance(item, ActNode):
            nonlinear += 1
        elif isinstance(item, ResidualItem):
            bn, bd, bc = _segment_counts(item.branch)
            sn, sd, sc = _segment_counts(item.shortcut or [])
            nonlinear, depth, convs = nonlinear + bn + sn, depth + max(bd, sd), convs + bc + sc
    return nonlinear, depth, convs


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # (not _ConvNd: a ConvTranspose's MACs follow its input, not its output)


def count_macs(model: nn.Module, input_size: int | Sequence[int] = 224) -> int:
    """Multiply-accumulates of convs (any dimension) and linear layers for one image (a real forward at batch 1)."""
    channels = getattr(model, "in_chans", None)
    input_size = input_shape(input_size, channels or 3)  # (a 1-channel model: 1, not 3)
    if channels is not None and input_size[0] != channels:  # (timm keeps (3, H, W) for an in_chans=1 model)
        raise ValueError(f"input_size {tuple(input_size)} has {input_size[0]} channel(s) but the model takes "
                         f"{channels}; give (height, width) or one side to count MACs at the model's channels")
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, _CONVS):  # Conv2d, and the Conv1d of ECA attention (ecaresnet*)
            total += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (*_CONVS, nn.Linear))]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def fold_stats(model: nn.Module, input_size: int | Sequence[int] | None = 224) -> FoldStats:
    """Stats of a timm model (prepared or not) or of a ``LayerFoldedNet``; ``input_size=None`` skips MACs."""
    if isinstance(model, LayerFoldedNet):
        counts = _spec_counts(model.model_args["features"] + model.model_args["pre_logits"])
    else:
        graph = build_graph(model)
        counts = _graph_counts(model, graph.features + graph.pre_logits)
    macs = None if input_size is None else count_macs(model, input_size)
    shape = None if input_size is None else input_shape(input_size, getattr(model, "in_chans", None) or 3)
    return FoldStats(*counts, params=sum(p.numel() for p in model.parameters()
                                         if not _is_alpha(model, p)), macs=macs, input_size=shape)


def _is_alpha(model: nn.Module, p: torch.Tensor) -> bool:
    return any(p is m.alpha for m in model.modules() if isinstance(m, FoldableActivation))


def projected_stats(model: nn.Module, plan: FoldPlan | Sequence[str] | None = None) -> FoldStats:
    """Non-linear layers, depth and convs the model would have once folded with ``plan`` (no folding done).

    ``plan`` defaults to the plan applied to the model, else the sites whose α reached the threshold.
    """
    require_unfolded(model, "projected_stats")
    if plan is None:  # (not `plan or ...`: an empty FoldPlan is falsy, and asks for the unfolded network)
        plan = getattr(model, "layerfold_plan", None)
    plan = FoldPlan.from_model(model) if plan is None else plan_of(model, plan, "projected_stats")
    check_plan(model, plan)
    seg = segment_model(model, plan)
    counts = _segment_counts(seg.items + seg.pre_logits)
    return FoldStats(*counts, params=None, macs=None)
