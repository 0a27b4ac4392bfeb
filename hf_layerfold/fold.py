"""``fold_model``: collapse a planned model into a ``LayerFoldedNet`` analytically (no autograd probing)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers.adaptive_avgmax_pool import adaptive_pool_feat_mult

from .activation import FoldableActivation
from .fold_math import add_shortcut_tap, compose_convs, dilate_kernel, fuse_bn, grouped_to_dense
from .folded_net import LayerFoldedNet, conv_spec, head_conv_width, op_spec, pool_type_of
from .graph import ConvNode, ModelGraph, build_graph, iter_nodes
from .padding import static_chain_padding
from .plan import (
    FoldPlan,
    ResidualItem,
    Run,
    applied_plan,
    apply_plan,
    as_plan,
    plan_of,
    run_pad_rules,
    segment_model,
    threshold_plan,
)
from .prepare import check_foldable, check_keepable_modules, is_prepared, require_module
from .timm_registry import ARCHITECTURE

State = dict[str, torch.Tensor]


def _fused_conv(model: nn.Module, node: ConvNode) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (dilation written out) and bias of a conv with its BatchNorm folded in, in float64."""
    conv = model.get_submodule(node.conv)
    w = conv.weight.detach().double()
    b = None if conv.bias is None else conv.bias.detach().double()
    if node.bn is not None:
        bn = model.get_submodule(node.bn)
        w, b = fuse_bn(w, b, bn.running_mean.double(), bn.running_var.double(), bn.eps,
                       None if bn.weight is None else bn.weight.detach().double(),
                       None if bn.bias is None else bn.bias.detach().double())
    elif b is None:
        b = w.new_zeros(w.shape[0])
    return dilate_kernel(w, conv.dilation), b


def merge_run(model: nn.Module, run: Run) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, int]]:
    """One conv (weight, bias, groups, stride) computing the whole run, given its padding moved in front."""
    first = model.get_submodule(run.convs[0].conv)
    w, b = _fused_conv(model, run.convs[0])
    groups, stride = first.groups, tuple(first.stride)
    for node in run.convs[1:]:
        conv = model.get_submodule(node.conv)
        w2, b2 = _fused_conv(model, node)
        w, b, groups = compose_convs(w, b, stride, groups, w2, b2, conv.groups)
        stride = (stride[0] * conv.stride[0], stride[1] * conv.stride[1])
    return w, b, groups, stride


class _Folder:
    def __init__(self, model: nn.Module, graph: ModelGraph) -> None:
        self.model = model
        self.dtype = _weights_dtype(model, graph)

    def conv(self, run: Run, shortcut: Run | None = None, identity: bool = False) -> tuple[dict, State]:
        """One merged conv for ``run``; with ``identity`` or a ``shortcut`` run, the residual is absorbed."""
        w, b, groups, stride = merge_run(self.model, run)
        rules = run_pad_rules(self.model, run)
        if shortcut is not None or identity:
            pads = static_chain_padding(rules)
            offset, sc_w = (pads[2], pads[0]), None  # the identity reads the tap under the output pixel
            if shortcut is not None:
                sc_w, sc_b, sc_groups, _ = merge_run(self.model, shortcut)
                sc_pads = static_chain_padding(run_pad_rules(self.model, shortcut))
                sc_w, b = grouped_to_dense(sc_w, sc_groups), b + sc_b
                offset = (pads[2] - sc_pads[2], pads[0] - sc_pads[0])
            w, groups = add_shortcut_tap(w, groups, sc_w, offset)
        template = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[-2:]), stride=stride, groups=groups,
                             bias=True, device="meta")
        # (copied: in float64 a conv that merged with nothing would otherwise share the caller's weight storage)
        return conv_spec(template, rules), {"weight": w.to(self.dtype, copy=True), "bias": b.to(self.dtype, copy=True)}

    def items(self, items: list) -> tuple[list[dict], State]:
        specs: list[dict] = []
        state: State = {}
        for item in items:
            if isinstance(item, Run):
                spec, sd = self.conv(item)
            elif isinstance(item, ResidualItem) and item.absorbed:
                shortcut = None if item.shortcut is None else item.shortcut[0]
                spec, sd = self.conv(item.branch[0], shortcut, identity=item.shortcut is None)
            elif isinstance(item, ResidualItem):
                branch, bsd = self.items(item.branch)
                spec, sd = {"type": "residual", "branch": branch, "shortcut": None}, _prefixed("branch.", bsd)
                if item.shortcut is not None:
                    shortcut, ssd = self.items(item.shortcut)
                    spec["shortcut"] = shortcut
                    sd.update(_prefixed("shortcut.", ssd))
            else:
                module = self.model.get_submodule(item.path)
                if isinstance(module, FoldableActivation):
                    module = module.act  # a FoldableActivation kept non-linear is its activation
                try:
                    spec = op_spec(module)
                except ValueError as err:
                    raise ValueError(f"{item.path}: {err}") from None
                sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
            state.update(_prefixed(f"{len(specs)}.", sd))
            specs.append(spec)
        return specs, state


def _weights_dtype(model: nn.Module, graph: ModelGraph) -> torch.dtype:
    """The dtype the folded net is built in: the model's first conv's. Not its first parameter's: that may be a
    site's α (always float32), e.g. when an activation is registered before the first conv."""
    first = next((n for n in iter_nodes([*graph.features, *graph.pre_logits]) if isinstance(n, ConvNode)), None)
    if first is not None:
        return model.get_submodule(first.conv).weight.dtype
    return next(p.dtype for m in model.modules() if not isinstance(m, FoldableActivation)
                for p in m.parameters(recurse=False))


def _prefixed(prefix: str, state: State) -> State:
    return {prefix + k: v for k, v in state.items()}


# What a timm pretrained_cfg says of the base model's weights: where they download from, and what they are. A folded
# net (and its save) holds other weights; an overlay at save time may describe those.
WEIGHT_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "tag", "label_offset")
WEIGHT_PROVENANCE_KEYS = ("description", "origin_url", "paper_ids", "paper_name", "notes")


def fold_model(model: nn.Module, plan: FoldPlan | Sequence[str] | None = None) -> LayerFoldedNet:
    """A new, shallower network computing what the planned ``model`` computes (the caller's model is untouched).

    ``model`` may be a plain timm model (BatchNorm is fused, nothing else changes), a prepared model (the plan
    defaults to the sites whose α reached the threshold, applied to a copy), or a planned model. BatchNorm folds
    with its running statistics, so the folded network computes what ``model`` computes in eval mode, whatever
    mode it is in (its mode is left as it was).
    """
    require_module(model, "fold_model")
    if isinstance(model, LayerFoldedNet):
        raise ValueError("the model is already folded (a LayerFoldedNet): there is nothing left to fold")
    if plan is not None:
        plan = plan_of(model, plan, "fold_model") if is_prepared(model) else as_plan(plan, "fold_model")
    if is_prepared(model):
        current = applied_plan(model)
        if current is None:
            plan = plan if plan is not None else threshold_plan(model, "fold_model")
            model = apply_plan(copy.deepcopy(model), plan)
        elif plan is not None and plan != current:
            raise ValueError("fold_model got a plan that differs from the one applied to the model")
        else:
            plan = current
    else:
        if plan is not None and len(plan):
            raise ValueError("plan names sites but the model is not prepared; call prepare_model first")
        plan = FoldPlan()
    if not is_prepared(model):  # (prepare_model checked a prepared one)
        check_foldable(model)
        check_keepable_modules(model)  # (UnsupportedModelError, as prepare_model raises, not a bare ValueError)
    was_training = model.training
    model.eval()
    try:
        seg = segment_model(model, plan)
        graph = build_graph(model)
        folder = _Folder(model, graph)
        features, fstate = folder.items(seg.items)
        pre_logits, pstate = folder.items(seg.pre_logits)
        classifier = model.get_submodule(graph.classifier)
    finally:
        model.train(was_training)
    global_pool = pool_type_of(model.get_submodule(graph.pool))
    # (a custom family may not say its width: the pooled features, which a head conv takes (catavgmax: twice
    # over), else the classifier's input; the classifier's input is the head's width)
    head_in = head_conv_width(pre_logits)
    num_features = getattr(model, "num_features", None) or (
        head_in // adaptive_pool_feat_mult(global_pool) if head_in
        else getattr(classifier, "in_features", 0))
    head_hidden_size = getattr(model, "head_hidden_size", None) or getattr(classifier, "in_features", None) \
        or num_features
    # (a headless model, num_classes=0, has an Identity classifier: no out_features to fall back on)
    num_classes = model.num_classes if hasattr(model, "num_classes") else classifier.out_features
    with torch.device("meta"):  # no weight init: every tensor is assigned below
        net = LayerFoldedNet(
            features, pre_logits, num_classes=num_classes,
            num_features=num_features, head_hidden_size=head_hidden_size,
            global_pool=global_pool,  # '' (no pooling) kept
            drop_rate=graph.drop_rate, in_chans=_input_channels(model, features),
        )
    state = _prefixed("features.", fstate)
    state.update(_prefixed("pre_logits.", pstate))
    state.update(_prefixed("classifier.", {k: v.detach().clone() for k, v in classifier.state_dict().items()}))
    net.load_state_dict(state, strict=True, assign=True)
    base_arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    net.pretrained_cfg = net.default_cfg = _folded_pretrained_cfg(model, net)
    net.layerfold_plan = plan
    net.layerfold_info = _provenance(model, net, base_arch)
    net.eval()
    return net


def folded_layout_cfg(net: LayerFoldedNet) -> dict:
    """The ``pretrained_cfg`` fields that describe a folded net's own layout (what it and its save record)."""
    first = net.model_args["features"][0] if net.model_args["features"] else {}
    return dict(architecture=ARCHITECTURE, num_classes=net.num_classes,
                first_conv="features.0" if first.get("type") == "conv" else None,
                # (named without one too, as timm's cfgs do: timm's loader drops a saved head, or loads the weights
                # non-strictly, only where the cfg names it, so a headless save could not take a new one)
                classifier="classifier")


def _folded_pretrained_cfg(model: nn.Module, net: LayerFoldedNet) -> dict:
    """The base model's preprocessing with the folded net's own layout (what a save of it reloads with): no weight
    source (``url``, ``hf_hub_id``, ...: those weights are not these), and ``num_classes``, ``first_conv`` and
    ``classifier`` naming what the folded net has, not the base model's ``conv_stem`` / ``fc`` / 1000 classes."""
    cfg = copy.deepcopy(getattr(model, "pretrained_cfg", None) or {})
    for key in WEIGHT_SOURCE_KEYS + WEIGHT_PROVENANCE_KEYS:
        cfg.pop(key, None)
    if cfg.get("num_classes") != net.num_classes:  # (names of the base model's classes, not of these)
        cfg.pop("label_names", None)
        cfg.pop("label_descriptions", None)
    cfg.update(folded_layout_cfg(net))
    return cfg


def _input_channels(model: nn.Module, features: list[dict]) -> int:
    """What the folded net takes: its first conv's input channels (a custom family may have no ``in_chans``)."""
    first = features[0] if features else {}
    return first["in"] if first.get("type") == "conv" else getattr(model, "in_chans", 3)


def _provenance(planned: nn.Module, net: LayerFoldedNet, base_arch: str | None) -> dict:
    """What a save of ``net`` alone can still say about its origin (its card names the base architecture and
    lists the merges)."""
    from .model_card import fold_rows  # (the card reads the plan's segmentation, as folding does)

    info: dict = {"base_architecture": base_arch} if base_arch else {}
    if is_prepared(planned):
        info["folds"] = fold_rows(planned, net)
    return info
