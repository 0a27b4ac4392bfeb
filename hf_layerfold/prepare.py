"""``prepare_model``: turn the candidate activations of a timm CNN into learnable-linear ones."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
from collections.abc import Mapping

import torch.nn as nn

from .activation import FoldableActivation
from .config import LayerFoldingConfig, as_config
from .folded_net import LayerFoldedNet, keepable_hint, op_spec, pool_type_of
from .fused import fuse_batchnorm_blends
from .graph import (
    BLOCK_RULES,
    ConvNode,
    UnsupportedModelError,
    build_graph,
    lookup_rule,
    model_candidate_acts,
    supported_block_types,
)
from .layers import HOOK_DICTS, has_hooks
from .plan import follow_applied_config

logger = logging.getLogger(__name__)


def _matches(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern) or name == pattern or name.startswith(pattern + "."):
            return True
    return False


def candidate_sites(model: nn.Module) -> list[str]:
    """Names of every activation whose removal would let two convs merge (prepared or not). An activation module
    called at several places (one ``nn.ReLU`` instance reused in ``forward``) is one site: its α serves them all."""
    return list(dict.fromkeys(act.path for act in model_candidate_acts(build_graph(model))))


def foldable_sites(model: nn.Module) -> list[str]:
    """Names of the sites a prepared model learns α for (or, unprepared, the sites it could learn)."""
    require_module(model, "foldable_sites")
    if isinstance(model, LayerFoldedNet):  # folded: no activation is left to fold
        return []
    prepared = [m.site for m in model.modules() if isinstance(m, FoldableActivation)]
    return prepared if prepared else candidate_sites(model)


def select_sites(model: nn.Module, config: LayerFoldingConfig) -> list[str]:
    sites = candidate_sites(model)
    if not sites:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no foldable activation (no activation sits between two convs); "
            f"supported block types: {', '.join(supported_block_types())}")
    chosen = [s for s in sites if (config.target_modules is None or _matches(s, config.target_modules))
              and not _matches(s, config.exclude_modules)]
    for name in ("target_modules", "exclude_modules"):  # a typo'd pattern would otherwise select (or spare) nothing
        stray = [p for p in getattr(config, name) or [] if not any(_matches(s, [p]) for s in sites)]
        if stray:
            logger.warning("%s pattern(s) %s match no foldable site of %s; its sites are e.g. %s (%d in all)",
                           name, stray, type(model).__name__, sites[:6], len(sites))
    if not chosen:
        raise ValueError(
            f"target_modules={config.target_modules} / exclude_modules={config.exclude_modules} select no site; "
            f"foldable sites are e.g. {sites[:6]} ({len(sites)} in all)")
    return chosen


def require_module(model: object, caller: str) -> None:
    """A model name or path handed where a module is expected fails here, naming what to pass (not deep inside)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} takes a torch.nn.Module (a timm model, prepared or planned), got "
                        f"{type(model).__name__}; build the model first, e.g. timm.create_model(name)")


def prepare_model(model: nn.Module, config: LayerFoldingConfig | Mapping | None = None) -> nn.Module:
    """Wrap every selected candidate activation in a ``FoldableActivation`` (in place; returns the model).

    The model keeps its class, parameters and state-dict keys (but a parametric activation's own weights, such as
    ``nn.PReLU``'s, move under ``<site>.act.``); α parameters are added as ``<site>.alpha``, and
    each site's phase (searching, or its plan's choice) as ``<site>._extra_state``, so planned weights refuse to
    load into a model without that plan. The config is kept on ``model.layerfold_config``.
    """
    require_module(model, "prepare_model")
    config = as_config(config)
    if isinstance(model, LayerFoldedNet):
        raise ValueError("the model is already folded (a LayerFoldedNet): fine-tune it as it is, or prepare the "
                         "unfolded network it came from")
    if any(isinstance(m, FoldableActivation) for m in model.modules()):
        raise ValueError("model is already prepared for layer folding")
    check_foldable(model)  # (first: a GroupNorm ResNet is named by its bn1, not by the shortcut norms kept as ops)
    check_keepable_modules(model)
    sites = select_sites(model, config)
    _check_merge_costs(model, config, sites)  # before the model changes: a refused table leaves it as it was
    device = next((p.device for p in model.parameters()), None)
    hooked = [s for s in sites if has_hooks(model.get_submodule(s))]
    if hooked:
        logger.warning("%d activation(s) carry hooks (%s): prepare_model replaces them with FoldableActivation "
                       "modules and does not carry the hooks over (the blend runs the activation on some paths "
                       "only); register them on the new modules (model.get_submodule(site)) after preparing",
                       len(hooked), ", ".join(hooked[:3]))
    for site in sites:
        act = model.get_submodule(site)
        wrapped = FoldableActivation(act, site, config.alpha_init, config.blend).to(device)
        wrapped.train(act.training)  # (a new module is in training mode: keep the model's mode, as eval() left it)
        if site in hooked:  # the copy inside would fire them on some paths and not others
            for name in HOOK_DICTS:
                getattr(wrapped.act, name, {}).clear()
        model.set_submodule(site, wrapped)
    if config.alpha_sharing == "block":
        share_alpha_by_block(model)
    if config.blend in ("compile", "auto"):  # BatchNorm + blend as one compiled region ("auto": on CPU; fused.py)
        fuse_batchnorm_blends(model)
    model.layerfold_config = config
    return model


def _check_merge_costs(model: nn.Module, config: LayerFoldingConfig, sites: list[str] | None = None) -> None:
    from .merge_costs import check_merge_costs  # (merge_costs reads this module's sites)

    check_merge_costs(model, config, sites)


def check_keepable_modules(model: nn.Module) -> None:
    """Fail now, not after a whole fine-tune, on a module the folded network could not keep as it is (an
    attention module, an anti-aliasing stage, ... that has no registered op)."""
    from .plan import FoldPlan, iter_kept, segment_model

    seg = segment_model(model, FoldPlan(), LayerFoldingConfig())  # (how runs split does not change what is kept)
    unkeepable = []
    for item in [*iter_kept(seg.items), *iter_kept(seg.pre_logits)]:
        module = model.get_submodule(item.path)
        try:
            op_spec(module.act if isinstance(module, FoldableActivation) else module)
        except ValueError:
            unkeepable.append(f"{item.path} ({type(module).__name__})")
    if unkeepable:
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be folded: a folded network could not keep {', '.join(unkeepable[:4])}"
            f"{f' and {len(unkeepable) - 4} more' if len(unkeepable) > 4 else ''}; {keepable_hint()}")


def check_foldable(model: nn.Module) -> None:
    """Every conv of the graph is an ``nn.Conv2d`` with zero padding, its BatchNorm keeps running statistics
    (folding uses them), and the pooling is one a folded net rebuilds: a model that breaks one of these failed only
    in ``fold_model``, after training (or folded wrongly), and a custom rule naming the wrong module failed deep
    inside it."""
    from .graph import ActNode, OpNode, iter_nodes

    graph = build_graph(model)
    _check_graph_paths(model, graph)
    try:
        pool_type_of(model.get_submodule(graph.pool))
    except ValueError as err:
        raise UnsupportedModelError(f"{type(model).__name__} cannot be folded: {err}") from None
    named = {n.path for n in iter_nodes([*graph.features, *graph.pre_logits]) if isinstance(n, ActNode | OpNode)}
    for node in iter_nodes([*graph.features, *graph.pre_logits]):
        if not isinstance(node, ConvNode):
            continue
        conv = model.get_submodule(node.conv)
        problem = None
        if not isinstance(conv, nn.Conv2d):
            problem = f"{node.conv} is a {type(conv).__name__}, where the model's graph expects a Conv2d"
        elif conv.padding_mode != "zeros":
            problem = f"{node.conv} has padding_mode={conv.padding_mode!r} (only 'zeros' folds)"
        elif node.bn is not None:
            bn = model.get_submodule(node.bn)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                problem = f"{node.bn} is a {type(bn).__name__}, where the model's graph expects a BatchNorm"
            elif bn.running_mean is None or bn.running_var is None:
                problem = (f"{node.bn} keeps no running statistics (track_running_stats=False); folding BatchNorm "
                           "into a conv uses them")
            else:  # timm's BatchNormAct2d runs its own drop and activation after the norm: the graph must name them
                missing = [f"{node.bn}.{name}" for name in ("drop", "act")
                           if isinstance(getattr(bn, name, None), nn.Module)
                           and not isinstance(getattr(bn, name), nn.Identity) and f"{node.bn}.{name}" not in named]
                if missing:
                    problem = (f"{node.bn} is a {type(bn).__name__}, which also applies {', '.join(missing)}, and the "
                               "model's graph leaves them out (they would be dropped from the folded net); a rule "
                               "names them with hf_layerfold.rules.conv_bn_act(block, path, conv, bn)")
        if problem:
            raise UnsupportedModelError(f"{type(model).__name__} cannot be folded: {problem}")


def _check_graph_paths(model: nn.Module, graph) -> None:
    """Every module a model's graph names exists, and the head is what a folded net rebuilds: a typo in a custom
    rule failed as a bare AttributeError (``Conv2d has no attribute `act```), and a ``Sequential(Dropout, Linear)``
    classifier only in ``fold_model``, after training."""
    from .graph import ActNode, OpNode, iter_nodes

    name = type(model).__name__
    paths = [("pool", graph.pool), ("classifier", graph.classifier)]
    for node in iter_nodes([*graph.features, *graph.pre_logits]):
        if isinstance(node, ConvNode):
            paths += [("conv", node.conv)] + ([("bn", node.bn)] if node.bn is not None else [])
        elif isinstance(node, ActNode | OpNode):
            paths.append((type(node).__name__, node.path))
    for role, path in paths:
        if not path and role != "pool":
            raise UnsupportedModelError(f"the folding rule of {name} names the model itself as a {role}")
        try:
            model.get_submodule(path)
        except AttributeError as err:
            raise UnsupportedModelError(f"the folding rule of {name} names {role} {path!r}, which is not a submodule "
                                        f"of the model ({err})") from None
    if not graph.pool:
        raise UnsupportedModelError(
            f"the folding rule of {name} names no pooling module (ModelGraph.pool=''); a folded net rebuilds global "
            "pooling from a module: name the model's nn.AdaptiveAvgPool2d(1) / timm SelectAdaptivePool2d, or attach "
            "one to the model if its forward pools functionally (F.adaptive_avg_pool2d)")
    classifier = model.get_submodule(graph.classifier)
    if not isinstance(classifier, nn.Linear | nn.Identity):
        raise UnsupportedModelError(
            f"the folding rule of {name} names classifier {graph.classifier!r}, a {type(classifier).__name__}; a "
            "folded net's classifier is one nn.Linear (or nn.Identity): name the Linear itself and give a dropout "
            "before it as ModelGraph(drop_rate=...)")


def site_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Block path → its foldable sites, in network order: a site belongs to the innermost module a block rule covers;
    a site outside any block is its own group. What ``alpha_sharing="block"`` ties and ``FoldPlan.from_blocks``
    takes."""
    from . import rules  # noqa: F401  (registers the built-in block rules)

    blocks = sorted((name for name, m in model.named_modules() if name and lookup_rule(BLOCK_RULES, m)),
                    key=len, reverse=True)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups: dict[str, list[str]] = {}
    for site in sorted(foldable_sites(model), key=lambda s: order.get(s, len(order))):
        groups.setdefault(next((b for b in blocks if site.startswith(b + ".")), site), []).append(site)
    return groups


def share_alpha_by_block(model: nn.Module) -> dict[str, list[str]]:
    """Tie the α of every site to the first site of its block (:func:`site_blocks`). Returns block path → its
    sites."""
    groups = site_blocks(model)
    for leader, *followers in groups.values():
        for follower in followers:
            model.get_submodule(follower).share_alpha(model.get_submodule(leader))
    return groups


def site_regularizer_weights(sites: list[str], weights: dict[str, float] | None) -> list[float] | None:
    """Each site's ``regularizer_weights`` entry: its exact name, else the first key matching it as a pattern (as
    in ``target_modules``), else 1. A key that matches no site raises: a typo would otherwise weigh nothing."""
    if not weights:
        return None
    unused = [key for key in weights if not any(_matches(site, [key]) for site in sites)]
    if unused:
        raise ValueError(f"regularizer_weights key(s) {unused} match no foldable site; the model's sites are e.g. "
                         f"{sites[:6]} ({len(sites)} in all)")
    return [float(weights[site]) if site in weights else
            next((float(w) for key, w in weights.items() if _matches(site, [key])), 1.0) for site in sites]


def alpha_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Site name → α parameter, in network order (sites that share an α map to the same parameter)."""
    require_module(model, "alpha_parameters")
    return {m.site: m.alpha for m in model.modules() if isinstance(m, FoldableActivation)}


def alpha_sharing_of(model: nn.Module) -> str:
    """``"block"`` when some site of a prepared model reads another site's α, else ``"site"``."""
    shared = any(isinstance(m, FoldableActivation) and m.alpha_owner != m.site for m in model.modules())
    return "block" if shared else "site"


def unique_alphas(alphas) -> list[nn.Parameter]:
    """Each α once (for optimizer groups: shared α appear under several sites); takes the α or
    ``alpha_parameters``' mapping of site to α."""
    if isinstance(alphas, Mapping):
        alphas = alphas.values()
    return list({id(a): a for a in alphas}.values())


def is_prepared(model: nn.Module) -> bool:
    return any(isinstance(m, FoldableActivation) for m in model.modules())


def ensure_prepared(model: nn.Module, config: LayerFoldingConfig | Mapping | None) -> LayerFoldingConfig:
    """Prepare ``model`` in place unless it already is, and return the config training should use.

    A prepared model keeps its sites and α; where ``config`` disagrees on how α is shared, the model wins (its
    α exist already) and the returned config follows it. A folded net has nothing to prepare: the config only
    carries the loss knobs.
    """
    if config is not None:
        config = as_config(config)
    if isinstance(model, LayerFoldedNet):
        return config or getattr(model, "layerfold_config", None) or LayerFoldingConfig()
    if not is_prepared(model):
        config = config or LayerFoldingConfig()
        prepare_model(model, config)  # raises when the config selects no site
        return config
    own = getattr(model, "layerfold_config", None)
    if config is None:
        return own or LayerFoldingConfig()
    if own is not None and (own.target_modules, own.exclude_modules) != (config.target_modules,
                                                                         config.exclude_modules):
        logger.warning("the model was prepared with other target/exclude modules than layerfold_config; "
                       "its prepared sites are kept")
    shared = own.alpha_sharing if own is not None else alpha_sharing_of(model)
    if config.alpha_sharing != shared:
        logger.warning("the model was prepared with alpha_sharing=%r, layerfold_config says %r; the model's "
                       "α are kept and the config follows them", shared, config.alpha_sharing)
        config = dataclasses.replace(config, alpha_sharing=shared)
    config = follow_applied_config(model, config, "layerfold_config")
    _check_merge_costs(model, config)  # before the model takes this config
    model.layerfold_config = config
    return config
