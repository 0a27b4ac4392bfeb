"""A small linear-structure view of a timm CNN, built by per-block rules held in registries.

A model becomes a list of nodes: convs (with the BatchNorm that follows them), activations, opaque ops
(SE, pooling, ...) and residuals (a branch list plus a shortcut list, or the identity). Folding reads only
this view, so supporting a new block type is one small rule: ``@register_block_rule(MyBlock)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn


@dataclass
class ConvNode:
    conv: str
    bn: str | None = None


@dataclass
class ActNode:
    path: str


@dataclass
class OpNode:
    path: str


@dataclass
class ResidualNode:
    path: str
    branch: list
    shortcut: list | None = None  # None: identity


Node = ConvNode | ActNode | OpNode | ResidualNode


@dataclass
class ModelGraph:
    """Trunk nodes (``forward_features``) and the head: pool → ``pre_logits`` nodes → flatten → classifier."""

    features: list
    pool: str
    classifier: str
    pre_logits: list = field(default_factory=list)
    drop_rate: float = 0.0


WRAPPER_ATTRS = ("module", "timm_model", "_orig_mod")  # DDP / DataParallel, transformers' TimmWrapper, compile


class UnsupportedModelError(ValueError):
    """The model (or one of its blocks) has no folding rule."""


BlockRule = Callable[[nn.Module, str], list]
ModelRule = Callable[[nn.Module], ModelGraph]
BLOCK_RULES: dict[type, BlockRule] = {}
MODEL_RULES: dict[type, ModelRule] = {}


def register_block_rule(*classes: type) -> Callable[[BlockRule], BlockRule]:
    """Register ``rule(block, path) -> list[Node]`` for blocks of these classes (and their subclasses)."""

    def wrap(rule: BlockRule) -> BlockRule:
        for cls in classes:
            BLOCK_RULES[cls] = rule
        return rule

    return wrap


def register_model_rule(*classes: type) -> Callable[[ModelRule], ModelRule]:
    """Register ``rule(model) -> ModelGraph`` for model classes (and their subclasses)."""

    def wrap(rule: ModelRule) -> ModelRule:
        for cls in classes:
            MODEL_RULES[cls] = rule
        return rule

    return wrap


def lookup_rule(registry: dict[type, Callable], obj: object) -> Callable | None:
    for cls in type(obj).__mro__:
        if cls in registry:
            return registry[cls]
    return None


def _type_name(cls: type) -> str:
    """``module.Class``: torchvision's ResNet is not timm's ``timm.models.resnet.ResNet``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def supported_block_types() -> list[str]:
    from . import rules  # noqa: F401  (registers the built-in rules)

    return sorted(_type_name(cls) for cls in BLOCK_RULES)


def supported_model_types() -> list[str]:
    from . import rules  # noqa: F401  (registers the built-in rules)

    return sorted(_type_name(cls) for cls in MODEL_RULES)


def block_nodes(block: nn.Module, path: str) -> list:
    """Nodes of one block, by its registered rule."""
    rule = lookup_rule(BLOCK_RULES, block)
    if rule is None:
        raise UnsupportedModelError(
            f"block {path!r} of type {_type_name(type(block))} has no folding rule; supported block types: "
            f"{', '.join(supported_block_types())} (register one with hf_layerfold.register_block_rule)")
    return rule(block, path)


def build_graph(model: nn.Module) -> ModelGraph:
    """The node view of a supported timm model."""
    from . import rules  # noqa: F401  (registers the built-in rules)

    rule = lookup_rule(MODEL_RULES, model)
    if rule is None:
        for attr in WRAPPER_ATTRS:
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and lookup_rule(MODEL_RULES, inner) is not None:
                raise UnsupportedModelError(
                    f"model type {type(model).__name__} is a wrapper, which is not supported: pass the "
                    f"{type(inner).__name__} it wraps (model.{attr}) instead: prepare, plan and fold the bare "
                    "model, and wrap it after prepare_model")
        raise UnsupportedModelError(
            f"model type {_type_name(type(model))} is not supported (no folding rule); supported model types: "
            f"{', '.join(supported_model_types())}, built from blocks: {', '.join(supported_block_types())}. "
            "Describe a new family with @hf_layerfold.register_model_rule(ItsClass), a function returning a "
            "hf_layerfold.graph.ModelGraph (README, \"A new model family\")")
    return rule(model)


def iter_nodes(nodes: list):
    """Every node, depth first, residual branches and shortcuts included."""
    for node in nodes:
        yield node
        if isinstance(node, ResidualNode):
            yield from iter_nodes(node.branch)
            if node.shortcut is not None:
                yield from iter_nodes(node.shortcut)


def iter_lists(nodes: list):
    """Every node list (the trunk, then each residual's branch and shortcut)."""
    yield nodes
    for node in nodes:
        if isinstance(node, ResidualNode):
            yield from iter_lists(node.branch)
            if node.shortcut is not None:
                yield from iter_lists(node.shortcut)


def candidate_acts(nodes: list) -> list[ActNode]:
    """Activations whose removal lets two convs merge: an activation directly between two convs."""
    found = []
    for lst in iter_lists(nodes):
        for i in range(1, len(lst) - 1):
            if isinstance(lst[i], ActNode) and isinstance(lst[i - 1], ConvNode) and isinstance(lst[i + 1], ConvNode):
                found.append(lst[i])
    return found


def model_candidate_acts(graph: ModelGraph) -> list[ActNode]:
    return candidate_acts(graph.features) + candidate_acts(graph.pre_logits)
