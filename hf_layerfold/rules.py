"""Built-in folding rules for timm's EfficientNet-family blocks, ResNet blocks and their model classes."""

from __future__ import annotations

import torch.nn as nn
from timm.models import _efficientnet_blocks as eb
from timm.models import efficientnet, mobilenetv3, resnet

from .graph import (
    ActNode,
    ConvNode,
    ModelGraph,
    OpNode,
    ResidualNode,
    UnsupportedModelError,
    block_nodes,
    register_block_rule,
    register_model_rule,
)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def op_nodes(module: nn.Module | None, path: str) -> list:
    """An opaque op, or nothing if the module is absent or the identity."""
    return [] if _is_identity(module) else [OpNode(path)]


def conv_bn_act(parent: nn.Module, path: str, conv: str, bn: str | None = None) -> list:
    """A conv, the BatchNorm after it, and the activation timm's ``BatchNormAct2d`` carries, if any."""
    conv_mod = getattr(parent, conv)
    if not isinstance(conv_mod, nn.Conv2d):
        raise UnsupportedModelError(f"{_join(path, conv)} is a {type(conv_mod).__name__}, not a Conv2d: only "
                                    "nn.Conv2d layers fold (timm's MixedConv2d of mixnet_* / tf_mixnet_* and "
                                    "CondConv2d do not)")
    bn_mod = getattr(parent, bn) if bn else None
    if _is_identity(bn_mod):
        return [ConvNode(_join(path, conv))]
    if not isinstance(bn_mod, nn.BatchNorm2d):
        raise UnsupportedModelError(f"{_join(path, bn)} is a {type(bn_mod).__name__}; only BatchNorm2d folds")
    nodes: list = [ConvNode(_join(path, conv), _join(path, bn))]
    nodes += op_nodes(getattr(bn_mod, "drop", None), _join(path, f"{bn}.drop"))
    act = getattr(bn_mod, "act", None)
    if not _is_identity(act):
        nodes.append(ActNode(_join(path, f"{bn}.act")))
    return nodes


def _residual(block: nn.Module, path: str, branch: list, shortcut: list | None = None) -> list:
    return [ResidualNode(path, branch, shortcut)] if block.has_skip else branch


@register_block_rule(eb.ConvBnAct)
def conv_bn_act_block(block: eb.ConvBnAct, path: str) -> list:
    branch = conv_bn_act(block, path, "conv", "bn1") + op_nodes(block.aa, _join(path, "aa"))
    return _residual(block, path, branch)


@register_block_rule(eb.DepthwiseSeparableConv)
def depthwise_separable(block: eb.DepthwiseSeparableConv, path: str) -> list:
    branch = conv_bn_act(block, path, "conv_s2d", "bn_s2d") if block.conv_s2d is not None else []
    branch += conv_bn_act(block, path, "conv_dw", "bn1")
    branch += op_nodes(block.aa, _join(path, "aa")) + op_nodes(block.se, _join(path, "se"))
    branch += conv_bn_act(block, path, "conv_pw", "bn2")
    return _residual(block, path, branch)


@register_block_rule(eb.CondConvResidual)  # (its own rule: an InvertedResidual subclass with its own forward)
def cond_conv_residual(block: eb.CondConvResidual, path: str) -> list:
    raise UnsupportedModelError(f"{path}: CondConvResidual (per-sample expert kernels) cannot be folded")


cond_conv_residual.refuses = True  # (not listed among the supported block types)


@register_block_rule(eb.InvertedResidual)
def inverted_residual(block: eb.InvertedResidual, path: str) -> list:
    branch = conv_bn_act(block, path, "conv_s2d", "bn_s2d") if block.conv_s2d is not None else []
    branch += conv_bn_act(block, path, "conv_pw", "bn1") + conv_bn_act(block, path, "conv_dw", "bn2")
    branch += op_nodes(block.aa, _join(path, "aa")) + op_nodes(block.se, _join(path, "se"))
    branch += conv_bn_act(block, path, "conv_pwl", "bn3")
    return _residual(block, path, branch)


@register_block_rule(eb.EdgeResidual)
def edge_residual(block: eb.EdgeResidual, path: str) -> list:
    branch = conv_bn_act(block, path, "conv_exp", "bn1")
    branch += op_nodes(block.aa, _join(path, "aa")) + op_nodes(block.se, _join(path, "se"))
    branch += conv_bn_act(block, path, "conv_pwl", "bn2")
    return _residual(block, path, branch)


def _shortcut(block: nn.Module, path: str) -> list | None:
    ds = block.downsample
    if ds is None:
        return None
    if isinstance(ds, nn.Sequential):
        nodes: list = []
        i = 0
        children = list(ds.named_children())
        while i < len(children):
            name, mod = children[i]
            if isinstance(mod, nn.Conv2d):
                bn = children[i + 1][0] if i + 1 < len(children) and isinstance(children[i + 1][1],
                                                                                 nn.BatchNorm2d) else None
                nodes += conv_bn_act(ds, _join(path, "downsample"), name, bn)
                i += 2 if bn else 1
            else:
                nodes += op_nodes(mod, _join(path, f"downsample.{name}"))
                i += 1
        return nodes
    return [OpNode(_join(path, "downsample"))]


@register_block_rule(resnet.BasicBlock)
def basic_block(block: resnet.BasicBlock, path: str) -> list:
    # (drop_block, like drop_path, is the identity in eval mode, where folding computes: not part of the graph)
    branch = [ConvNode(_join(path, "conv1"), _join(path, "bn1"))]
    branch += [ActNode(_join(path, "act1"))] + op_nodes(block.aa, _join(path, "aa"))
    branch += [ConvNode(_join(path, "conv2"), _join(path, "bn2"))] + op_nodes(block.se, _join(path, "se"))
    return [ResidualNode(path, branch, _shortcut(block, path)), ActNode(_join(path, "act2"))]


@register_block_rule(resnet.Bottleneck)
def bottleneck(block: resnet.Bottleneck, path: str) -> list:
    branch = [ConvNode(_join(path, "conv1"), _join(path, "bn1")), ActNode(_join(path, "act1")),
              ConvNode(_join(path, "conv2"), _join(path, "bn2"))]  # (drop_block: see basic_block)
    branch += [ActNode(_join(path, "act2"))] + op_nodes(block.aa, _join(path, "aa"))
    branch += [ConvNode(_join(path, "conv3"), _join(path, "bn3"))] + op_nodes(block.se, _join(path, "se"))
    return [ResidualNode(path, branch, _shortcut(block, path)), ActNode(_join(path, "act3"))]


def _blocks(seq: nn.Module, path: str) -> list:
    nodes: list = []
    for name, child in seq.named_children():
        child_path = _join(path, name)
        if isinstance(child, nn.Sequential):
            nodes += _blocks(child, child_path)
        else:
            nodes += block_nodes(child, child_path)
    return nodes


@register_model_rule(efficientnet.EfficientNet)
def efficientnet_model(model: efficientnet.EfficientNet) -> ModelGraph:
    features = conv_bn_act(model, "", "conv_stem", "bn1") + _blocks(model.blocks, "blocks")
    if not _is_identity(model.conv_head):
        features += conv_bn_act(model, "", "conv_head", "bn2")
    return ModelGraph(features, "global_pool", "classifier", drop_rate=model.drop_rate)


@register_model_rule(mobilenetv3.MobileNetV3)
def mobilenetv3_model(model: mobilenetv3.MobileNetV3) -> ModelGraph:
    features = conv_bn_act(model, "", "conv_stem", "bn1") + _blocks(model.blocks, "blocks")
    pre_logits: list = []
    if not _is_identity(model.conv_head):
        pre_logits = conv_bn_act(model, "", "conv_head", "norm_head")
        if not _is_identity(model.act2):
            pre_logits.append(ActNode("act2"))
    return ModelGraph(features, "global_pool", "classifier", pre_logits, drop_rate=model.drop_rate)


def _deep_stem(stem: nn.Sequential) -> list:
    """ResNet-C/D stems: ``conv1`` is (conv, bn, act, conv, bn, act, conv); the last conv's BN is ``bn1``."""
    nodes: list = []
    children = list(stem.named_children())
    for i, (name, mod) in enumerate(children):
        path = f"conv1.{name}"
        if isinstance(mod, nn.Conv2d):
            has_bn = i + 1 < len(children) and isinstance(children[i + 1][1], nn.BatchNorm2d)
            nodes.append(ConvNode(path, f"conv1.{children[i + 1][0]}" if has_bn else "bn1"))
        elif not isinstance(mod, nn.BatchNorm2d):
            nodes.append(ActNode(path))
    return nodes


@register_model_rule(resnet.ResNet)
def resnet_model(model: resnet.ResNet) -> ModelGraph:
    stem = _deep_stem(model.conv1) if isinstance(model.conv1, nn.Sequential) else [ConvNode("conv1", "bn1")]
    features = stem + [ActNode("act1")] + op_nodes(model.maxpool, "maxpool")
    for i in range(1, 5):
        features += _blocks(getattr(model, f"layer{i}"), f"layer{i}")
    return ModelGraph(features, "global_pool", "fc", drop_rate=float(model.drop_rate or 0.0))
