"""A small linear-structure view of a timm CNN, built by per-block rules held in registries.

A model becomes a list of nodes: convs (with the BatchNorm that follows them), activations, opaque ops
(SE, pooling, ...) and residuals (a branch list plus a shortcut list, or the identity). Folding reads only
this view, so supporting a new block type is one small rule: ``@register_block_rule(MyBlock)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

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


# (Any: a rule takes the block / model class it is registered for, which nn.Module would refuse to a type checker)
BlockRule = Callable[[Any, str], list]
ModelRule = Callable[[Any], ModelGraph]
_BlockRuleT = TypeVar("_BlockRuleT", bound=BlockRule)
_ModelRuleT = TypeVar("_ModelRuleT", bound=ModelRule)
BLOCK_RULES: dict[type, BlockRule] = {}
MODEL_RULES: dict[type, ModelRule] = {}


def _check_classes(who: str, classes: tuple) -> None:
    """A decorator used bare (``@register_block_rule`` over the function) or given an instance or a name registered
    nothing, and a later error blamed the model (or failed listing the supported types)."""
    if len(classes) == 1 and inspect.isfunction(classes[0]):
        raise TypeError(f"{who} takes the class(es) the rule describes: write @{who}(MyClass) above the rule, not "
                        f"@{who} alone")
    if not classes:
        raise TypeError(f"{who}() needs at least one class: @{who}(MyClass)")
    bad = [c for c in classes if not isinstance(c, type)]
    if bad:
        raise TypeError(f"{who} takes classes, got {', '.join(repr(c) for c in bad)}: pass the class itself "
                        "(MyBlock, not MyBlock(...) nor 'MyBlock')")


def register_block_rule(*classes: type) -> Callable[[_BlockRuleT], _BlockRuleT]:
    """Register ``rule(block, path) -> list[Node]`` for blocks of these classes (and their subclasses that keep
    the class's ``forward``: a subclass with a ``forward`` of its own needs a rule of its own)."""
    _check_classes("register_block_rule", classes)

    def wrap(rule: _BlockRuleT) -> _BlockRuleT:
        for cls in classes:
            BLOCK_RULES[cls] = rule
        return rule

    return wrap


def register_model_rule(*classes: type) -> Callable[[_ModelRuleT], _ModelRuleT]:
    """Register ``rule(model) -> ModelGraph`` for model classes (and their subclasses that keep the class's
    ``forward``, ``forward_features`` and ``forward_head``)."""
    _check_classes("register_model_rule", classes)

    def wrap(rule: _ModelRuleT) -> _ModelRuleT:
        for cls in classes:
            MODEL_RULES[cls] = rule
        return rule

    return wrap


def lookup_rule(registry: dict[type, Callable], obj: object) -> Callable | None:
    for cls in type(obj).__mro__:
        if cls in registry:
            return registry[cls]
    return None


BLOCK_METHODS = ("forward",)
MODEL_METHODS = ("forward", "forward_features", "forward_head")


def checked_rule(registry: dict[type, Callable], obj: object, path: str, methods: tuple[str, ...]) -> Callable | None:
    """``lookup_rule``, refusing a rule inherited by a subclass that computes otherwise: the parent's rule describes
    the parent's ``forward``, and a fold by it silently computed another function."""
    for cls in type(obj).__mro__:
        if cls not in registry:
            continue
        own = [m for m in methods if getattr(type(obj), m, None) is not getattr(cls, m, None)]
        if own:
            rule, name = registry[cls], type(obj).__name__
            parent_rule = f"{getattr(rule, '__module__', '')}.{getattr(rule, '__qualname__', rule)}"
            register = f"register_{'block' if methods == BLOCK_METHODS else 'model'}_rule"
            raise UnsupportedModelError(
                f"{path} is a {_type_name(type(obj))}, a subclass of {_type_name(cls)} with its own "
                f"{', '.join(own)}: the rule of {cls.__name__} describes what {cls.__name__} computes, not what {name} "
                f"does. Register a rule for it (@hf_layerfold.{register}({name}); the parent's rule if it computes "
                f"the same: {register}({name})({parent_rule}))")
        return registry[cls]
    return None


def _type_name(cls: type) -> str:
    """``module.Class``: torchvision's ResNet is not timm's ``timm.models.resnet.ResNet``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def supported_block_types() -> list[str]:
    from . import rules  # noqa: F401  (registers the built-in rules)

    return sorted(_type_name(cls) for cls, rule in BLOCK_RULES.items() if not getattr(rule, "refuses", False))


def supported_model_types() -> list[str]:
    from . import rules  # noqa: F401  (registers the built-in rules)

    return sorted(_type_name(cls) for cls in MODEL_RULES)


def block_nodes(block: nn.Module, path: str) -> list:
    """Nodes of one block, by its registered rule."""
    rule = checked_rule(BLOCK_RULES, block, f"block {path!r}", BLOCK_METHODS)
    if rule is None:
        raise UnsupportedModelError(
            f"block {path!r} of type {_type_name(type(block))} has no folding rule; supported block types: "
            f"{', '.join(supported_block_types())} (register one with hf_layerfold.register_block_rule)")
    nodes = rule(block, path)
    check_nodes(nodes, f"the folding rule {getattr(rule, '__qualname__', rule)!r} of block {path!r} "
                       f"({type(block).__name__})")
    return nodes


def check_nodes(nodes: object, who: str, where: str = "") -> None:
    """A rule's description is a list of nodes (``ConvNode``, ``ActNode``, ``OpNode``, ``ResidualNode``) naming
    modules by their path: anything else failed later as a bare TypeError or AttributeError naming no rule."""
    if not isinstance(nodes, list | tuple):
        what = f"returned, at {where}, a" if where else "returned a"
        raise UnsupportedModelError(f"{who} {what} {type(nodes).__name__}, not a list of nodes "
                                    "(ConvNode, ActNode, OpNode, ResidualNode from hf_layerfold.graph)")
    for i, node in enumerate(nodes):
        at = f"{where}[{i}]"
        if isinstance(node, ResidualNode):
            check_nodes(node.branch, who, f"{at}.branch")
            if node.shortcut is not None:
                check_nodes(node.shortcut, who, f"{at}.shortcut")
            continue
        if not isinstance(node, ConvNode | ActNode | OpNode):
            raise UnsupportedModelError(f"{who} returned {node!r} at {at or 'top level'}: a node must be a ConvNode, "
                                        "ActNode, OpNode or ResidualNode (hf_layerfold.graph)")
        names = [node.conv, node.bn] if isinstance(node, ConvNode) else [node.path]
        if not isinstance(names[0], str) or (len(names) > 1 and not isinstance(names[1], str | None)):
            raise UnsupportedModelError(f"{who} returned {node!r} at {at or 'top level'}: a node names its modules by "
                                        "their path in the model (a string, e.g. f'{path}.conv1')")


def wrapper_error(model: nn.Module) -> UnsupportedModelError | None:
    """The error for a wrapper (DDP / DataParallel, transformers' TimmWrapper*, ``torch.compile``) around a model
    this library reads, naming the attribute to pass instead; None for anything else."""
    from .folded_net import LayerFoldedNet

    if isinstance(model, LayerFoldedNet) or lookup_rule(MODEL_RULES, model) is not None:
        return None
    for attr in WRAPPER_ATTRS:
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and (isinstance(inner, LayerFoldedNet)
                                             or lookup_rule(MODEL_RULES, inner) is not None):
            then = ("fine-tune and save it bare (a folded save loads through transformers afterwards)"
                    if isinstance(inner, LayerFoldedNet) else "prepare, train, plan and fold the bare model")
            return UnsupportedModelError(
                f"model type {type(model).__name__} is a wrapper, which is not supported: pass the "
                f"{type(inner).__name__} it wraps (model.{attr}) instead: {then}")
    return None


def build_graph(model: nn.Module) -> ModelGraph:
    """The node view of a supported timm model."""
    from . import rules  # noqa: F401  (registers the built-in rules)

    rule = checked_rule(MODEL_RULES, model, f"the model ({type(model).__name__})", MODEL_METHODS)
    if rule is None:
        wrapped = wrapper_error(model)
        if wrapped is not None:
            raise wrapped
        raise UnsupportedModelError(
            f"model type {_type_name(type(model))} is not supported (no folding rule); supported model types: "
            f"{', '.join(supported_model_types())}, built from blocks: {', '.join(supported_block_types())}. "
            "Describe a new family with @hf_layerfold.register_model_rule(ItsClass), a function returning a "
            "hf_layerfold.graph.ModelGraph (README, \"A new model family\")")
    graph = rule(model)
    who = f"the folding rule {getattr(rule, '__qualname__', rule)!r} of {type(model).__name__}"
    if not isinstance(graph, ModelGraph):
        raise UnsupportedModelError(f"{who} returned {type(graph).__name__}, not a hf_layerfold.graph.ModelGraph")
    check_nodes(graph.features, who, "features")
    check_nodes(graph.pre_logits, who, "pre_logits")
    return graph


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
