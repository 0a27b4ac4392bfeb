"""``LayerFoldedNet``: the shallow network a fold produces, rebuilt from a JSON spec alone.

The spec (``features`` / ``pre_logits`` lists of layer dicts) is what ``config.json`` carries as
``model_args``, so a folded checkpoint loads through ``timm.create_model`` with no base weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.layers.eca import EcaModule
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from timm.layers.squeeze_excite import SEModule
from timm.models import _efficientnet_blocks as eb
from timm.models import checkpoint_seq

from .layers import PaddedConv2d, Residual, activation_spec, build_activation
from .padding import PadRule, static_chain_padding

# Opaque ops a folded model can keep: class → to_spec, and spec "type" → builder.
OP_SPECS: dict[type, Callable[[nn.Module], dict]] = {}
OP_BUILDERS: dict[str, Callable[[dict], nn.Module]] = {}
OP_KINDS: dict[type, str] = {}
RESERVED_KINDS = frozenset({"conv", "act", "residual"})  # build_layer handles these itself


def register_op(cls: type, kind: str, to_spec: Callable[[Any], dict],
                from_spec: Callable[[dict], nn.Module]) -> None:
    """Teach folded models to keep (serialize and rebuild) a module type that does not fold.

    ``to_spec(module)`` gives the JSON-able fields ``from_spec(spec)`` rebuilds the module from (its weights come
    from the state dict); the saved spec carries ``"type": kind``. A save holding such a module loads only where
    the same ``register_op`` ran first (before ``from_pretrained`` / ``timm.create_model``).
    """
    if kind in RESERVED_KINDS:
        raise ValueError(f"register_op: kind {kind!r} is a built-in layer type; choose another name")
    owner = next((c for c, k in OP_KINDS.items() if k == kind and  # (a class redefined, as a notebook does: the same)
                  (c.__module__, c.__qualname__) != (cls.__module__, cls.__qualname__)), None)
    if owner is not None:
        raise ValueError(f"register_op: kind {kind!r} is already registered for {owner.__name__}; a second "
                         f"builder would rebuild every saved {owner.__name__} as a {cls.__name__}")

    def spec_of(m: nn.Module) -> dict:
        fields = to_spec(m)
        if "type" in fields:
            raise ValueError(f"register_op({cls.__name__}): to_spec returned a 'type' field, which names the layer "
                             f"kind ({kind!r}) in a saved spec; call it something else")
        return {"type": kind, **fields}

    OP_SPECS[cls] = spec_of
    OP_KINDS[cls] = kind
    OP_BUILDERS[kind] = from_spec


def _se_build(spec: dict) -> nn.Module:
    se = eb.SqueezeExcite(spec["channels"], rd_channels=spec["rd_channels"])
    se.act1, se.gate = build_activation(spec["act"]), build_activation(spec["gate"])
    return se


register_op(eb.SqueezeExcite, "se",
            lambda m: {"channels": m.conv_reduce.in_channels, "rd_channels": m.conv_reduce.out_channels,
                       "act": activation_spec(m.act1), "gate": activation_spec(m.gate)},
            _se_build)


def _timm_se_spec(m: SEModule) -> dict:
    if not isinstance(m.bn, nn.Identity):
        raise ValueError("a folded model cannot keep an SEModule with a norm layer")
    return {"channels": m.fc1.in_channels, "rd_channels": m.fc1.out_channels, "bias": m.fc1.bias is not None,
            "add_maxpool": m.add_maxpool, "act": activation_spec(m.act), "gate": activation_spec(m.gate)}


def _timm_se_build(spec: dict) -> nn.Module:
    se = SEModule(spec["channels"], rd_channels=spec["rd_channels"], bias=spec["bias"], add_maxpool=spec["add_maxpool"])
    se.act, se.gate = build_activation(spec["act"]), build_activation(spec["gate"])
    return se


def _eca_spec(m: EcaModule) -> dict:
    if m.conv2 is not None:
        raise ValueError("a folded model cannot keep an EcaModule with use_mlp=True")
    return {"kernel_size": m.conv.kernel_size[0], "gate": activation_spec(m.gate)}


def _eca_build(spec: dict) -> nn.Module:
    eca = EcaModule(kernel_size=spec["kernel_size"])
    eca.gate = build_activation(spec["gate"])
    return eca


# the SE / ECA attention of seresnet*, seresnext*, ecaresnet* (timm.layers, not the EfficientNet-block SqueezeExcite)
register_op(SEModule, "timm_se", _timm_se_spec, _timm_se_build)
register_op(EcaModule, "timm_eca", _eca_spec, _eca_build)
register_op(nn.MaxPool2d, "maxpool",
            lambda m: {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                       "dilation": m.dilation, "ceil_mode": m.ceil_mode},
            lambda s: nn.MaxPool2d(s["kernel_size"], s["stride"], s["padding"], s["dilation"],
                                   ceil_mode=s["ceil_mode"]))
register_op(nn.AvgPool2d, "avgpool",
            lambda m: {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                       "ceil_mode": m.ceil_mode, "count_include_pad": m.count_include_pad},
            lambda s: nn.AvgPool2d(s["kernel_size"], s["stride"], s["padding"], ceil_mode=s["ceil_mode"],
                                   count_include_pad=s["count_include_pad"]))
register_op(nn.Dropout, "dropout", lambda m: {"p": m.p}, lambda s: nn.Dropout(s["p"]))
# timm's TF-"same" pools pad by the input's size at run time (resnet*d shortcuts at output_stride 16 or 8)
register_op(AvgPool2dSame, "avgpool_same",
            lambda m: {"kernel_size": m.kernel_size, "stride": m.stride, "ceil_mode": m.ceil_mode,
                       "count_include_pad": m.count_include_pad},
            lambda s: AvgPool2dSame(s["kernel_size"], s["stride"], ceil_mode=s["ceil_mode"],
                                    count_include_pad=s["count_include_pad"]))
register_op(MaxPool2dSame, "maxpool_same",
            lambda m: {"kernel_size": m.kernel_size, "stride": m.stride, "dilation": m.dilation,
                       "ceil_mode": m.ceil_mode},
            lambda s: MaxPool2dSame(s["kernel_size"], s["stride"], dilation=s["dilation"], ceil_mode=s["ceil_mode"]))


BUILTIN_KINDS = frozenset(OP_BUILDERS) | RESERVED_KINDS  # what any process that imports hf_layerfold can build


def registered_kinds(specs: list[dict]) -> list[str]:
    """The layer types of ``specs`` (residuals searched) that only a ``register_op`` of the saving code builds."""
    found: set[str] = set()
    for spec in specs:
        if spec.get("type") == "residual":
            found.update(registered_kinds(spec.get("branch") or []), registered_kinds(spec.get("shortcut") or []))
        elif spec.get("type") not in BUILTIN_KINDS:
            found.add(spec.get("type"))
    return sorted(found)


def op_spec(module: nn.Module) -> dict:
    """Spec of a kept module (a registered op or an activation); anything else raises, naming what is keepable."""
    for cls in type(module).__mro__:
        if cls in OP_SPECS:
            if type(module).forward is not cls.forward:  # a subclass that computes otherwise: not that op
                raise ValueError(f"a folded model cannot keep a {type(module).__name__}: it subclasses "
                                 f"{cls.__name__} but has a forward of its own; {keepable_hint()}")
            return OP_SPECS[cls](module)
    try:
        return activation_spec(module)
    except ValueError:
        raise ValueError(f"a folded model cannot keep a {type(module).__name__}; {keepable_hint()}") from None


def keepable_hint() -> str:
    """What a folded model can keep besides its convs (named in the errors about what it cannot)."""
    from .layers import ACTIVATIONS

    return (f"keepable modules: {sorted(c.__name__ for c in OP_SPECS)} and the activation classes of "
            f"hf_layerfold.layers.ACTIVATIONS ({', '.join(sorted({c.__name__ for c in ACTIVATIONS.values()}))}; "
            "by exact class: a subclass, such as timm's PReLU, is not one). Register more, a custom activation "
            "included, with hf_layerfold.register_op(cls, kind, to_spec, from_spec)")


def conv_spec(conv: nn.Conv2d, pad_rules: list[PadRule] | None = None) -> dict:
    """Spec of a conv; ``pad_rules`` (a run's rules) override the conv's own padding."""
    spec = {"type": "conv", "in": conv.in_channels, "out": conv.out_channels,
            "kernel": list(conv.kernel_size), "stride": list(conv.stride), "dilation": list(conv.dilation),
            "groups": conv.groups, "bias": conv.bias is not None}
    if pad_rules is not None:
        pads = static_chain_padding(pad_rules)
        if pads is not None and pads[0] == pads[1] and pads[2] == pads[3]:
            spec["padding"] = [pads[2], pads[0]]
        else:
            spec["pad_rules"] = [r.to_dict() for r in pad_rules]
    else:
        spec["padding"] = list(conv.padding)
    return spec


FORMAT_VERSION = 1  # of a folded save's spec (config.json's layerfold block records it); bump on a change old
# readers would misread


MAX_SPEC_PARAMS = int(os.environ.get("HF_LAYERFOLD_MAX_PARAMS", 2 * 10**9))  # refused before any allocation


class FoldedSpecError(ValueError):
    """``config.json``'s ``model_args`` do not describe a folded net this version can build (a hand edit, a newer
    hf_layerfold's save, a truncated or foreign file): the structure, not the weights, is at fault."""


class UnknownLayerTypeError(FoldedSpecError):
    """A spec names a layer type no op is registered for here (a ``register_op`` of the code that saved it)."""


def check_format(layerfold: object) -> None:
    """Refuse a save whose ``layerfold.format_version`` is newer than this reader's (its spec may hold fields this
    version would silently ignore); a save without one (hand-made, older) is read as version 1."""
    version = layerfold.get("format_version", 1) if isinstance(layerfold, dict) else 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise FoldedSpecError(f"config.json's layerfold.format_version is {version!r}, not a positive whole number")
    if version > FORMAT_VERSION:
        writer = layerfold.get("hf_layerfold_version", "a newer hf_layerfold")
        raise FoldedSpecError(f"this folded save has format_version {version} (written by hf_layerfold {writer}); "
                              f"this hf_layerfold reads format_version <= {FORMAT_VERSION}: upgrade hf_layerfold "
                              "(pip install -U hf_layerfold) to load it")


def _whole(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_conv_spec(spec: dict) -> None:
    """Refuse a conv spec torch would build but not run (stride 0, negative padding), or would build from the wrong
    types (a string ``bias`` is true): each field named (``build_sequence`` adds the place), before anything is
    allocated."""
    for name in ("in", "out", "groups"):
        if name in spec and not _whole(spec[name], 1):
            raise ValueError(f"field {name!r} must be a positive whole number, got {spec[name]!r}")
    for name, low in (("kernel", 1), ("stride", 1), ("dilation", 1), ("padding", 0)):
        if name in spec and not (isinstance(spec[name], list | tuple) and len(spec[name]) == 2
                                 and all(_whole(v, low) for v in spec[name])):
            raise ValueError(f"field {name!r} must be two whole numbers >= {low}, got {spec[name]!r}")
    if "bias" in spec and not isinstance(spec["bias"], bool):
        raise ValueError(f"field 'bias' must be true or false, got {spec['bias']!r}")


def spec_numel(specs: list) -> int:
    """Parameters the convs of ``specs`` (residuals searched) hold, counted from the spec alone (nothing built)."""
    total = 0
    for spec in specs if isinstance(specs, list | tuple) else ():
        if not isinstance(spec, dict):
            continue
        if spec.get("type") == "residual":
            total += spec_numel(spec.get("branch") or []) + spec_numel(spec.get("shortcut") or [])
        elif spec.get("type") == "conv":
            try:
                kh, kw = spec["kernel"]
                total += spec["in"] // spec["groups"] * spec["out"] * kh * kw + spec["out"] * bool(spec["bias"])
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                pass  # (refused, field by field, when the layer is built)
    return total


def build_layer(spec: dict, path: str = "features[?]") -> nn.Module:
    kind = spec.get("type")
    if kind == "conv":
        check_conv_spec(spec)
        kwargs = dict(stride=tuple(spec["stride"]), dilation=tuple(spec.get("dilation", (1, 1))),
                      groups=spec["groups"], bias=spec["bias"])
        if "pad_rules" in spec:
            rules = [PadRule.from_dict(r) for r in spec["pad_rules"]]
            return PaddedConv2d(spec["in"], spec["out"], tuple(spec["kernel"]), pad_rules=rules, **kwargs)
        return nn.Conv2d(spec["in"], spec["out"], tuple(spec["kernel"]), padding=tuple(spec["padding"]), **kwargs)
    if kind == "act":
        return build_activation(spec)
    if kind == "residual":
        shortcut = None if spec.get("shortcut") is None else build_sequence(spec["shortcut"], f"{path}.shortcut")
        return Residual(build_sequence(spec["branch"], f"{path}.branch"), shortcut)
    if kind in OP_BUILDERS:
        return OP_BUILDERS[kind](spec)
    raise UnknownLayerTypeError(
        f"unknown layer type {kind!r} in a folded-model spec: the model was saved with a module kept through "
        f"hf_layerfold.register_op(<its class>, {kind!r}, to_spec, from_spec); run that same register_op before "
        f"loading. Layer types known here: {sorted(RESERVED_KINDS | set(OP_BUILDERS))}")


def build_sequence(specs: list[dict], where: str = "features") -> nn.Sequential:
    """The layers of ``specs`` (``where``: their place in ``model_args``, named in errors). A spec that cannot be
    built (a missing field, a value of the wrong type) is a :class:`FoldedSpecError` naming that place, not a
    ``KeyError`` from inside the builder."""
    if not isinstance(specs, list | tuple):
        raise FoldedSpecError(f"config.json model_args.{where} must be a list of layer specs, got "
                              f"{type(specs).__name__}")
    layers = []
    for i, spec in enumerate(specs):
        path = f"{where}[{i}]"
        if not isinstance(spec, dict):
            raise FoldedSpecError(f"config.json model_args.{path} must be a layer spec (a JSON object), got {spec!r}")
        try:
            layers.append(build_layer(spec, path))
        except FoldedSpecError:  # (a nested sequence's, already naming its place)
            raise
        except KeyError as err:
            raise FoldedSpecError(f"config.json model_args.{path} (type {spec.get('type')!r}) lacks the field "
                                  f"{err.args[0]!r}: {_brief(spec)}") from None
        except (TypeError, ValueError, AssertionError, RuntimeError) as err:  # (RuntimeError: a negative size)
            raise FoldedSpecError(f"config.json model_args.{path} (type {spec.get('type')!r}) is not a valid "
                                  f"layer spec ({err}): {_brief(spec)}") from None
    return nn.Sequential(*layers)


def _brief(spec: dict) -> str:
    text = repr({k: v for k, v in spec.items() if k not in ("branch", "shortcut")})
    return text if len(text) <= 300 else text[:300] + "…"


def pool_type_of(pool: nn.Module) -> str:
    """The timm ``global_pool`` name of a model's pooling module (``""``: none): what a folded net rebuilds it
    from. A pool it cannot rebuild is refused: folding it as an average pool gave other outputs."""
    if isinstance(pool, SelectAdaptivePool2d):
        return pool.pool_type
    if isinstance(pool, nn.Identity):
        return ""
    size = getattr(pool, "output_size", None)
    if size in (1, (1, 1)) and isinstance(pool, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        return "avg" if isinstance(pool, nn.AdaptiveAvgPool2d) else "max"
    raise ValueError(f"the model's pooling {type(pool).__name__} cannot be rebuilt in a folded net; supported: "
                     "timm's SelectAdaptivePool2d, nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1), nn.Identity")


def _taking_channels(features: list[dict], in_chans: int) -> list[dict]:
    """The spec with its first conv taking ``in_chans`` channels: ``timm.create_model(..., in_chans=1)`` on a save
    of an RGB model asks for that, and timm's loader then sums the saved kernels over their input channels (a
    grayscale image then gives what the RGB model gives on that image in three equal channels); ``in_chans=3`` on
    a save of a 1-channel model repeats them (timm adapts from the channel count the save's ``input_size`` gives)."""
    first = features[0] if features else {}
    if first.get("type") != "conv" or first.get("in") == in_chans:
        return features
    if first.get("in") != 3 and not _TIMM_ADAPTS_ANY_CHANNELS:
        return features  # (this timm adapts RGB kernels only; a save's own channel count is its first conv's)
    if first.get("groups") != 1:
        raise ValueError(f"in_chans={in_chans}: the folded net's first conv is grouped ({first.get('groups')} "
                         f"groups of {first.get('in')} input channels) and cannot take another channel count")
    return [{**first, "in": in_chans}, *features[1:]]


def _timm_adapts_any_channels() -> bool:
    """Whether this timm's loader adapts a first conv from any saved channel count (``adapt_input_conv``'s
    ``base_chans``, from the save's ``input_size``), not from RGB only."""
    import inspect

    from timm.models import adapt_input_conv

    return "base_chans" in inspect.signature(adapt_input_conv).parameters


_TIMM_ADAPTS_ANY_CHANNELS = _timm_adapts_any_channels()


def head_conv_width(pre_logits: list[dict]) -> int | None:
    """Input channels of the first conv of a folded net's head (``None``: no head conv)."""
    first = pre_logits[0] if pre_logits else {}
    return first.get("in") if first.get("type") == "conv" else None


def check_pretrained_cfg(cfg: Any, where: str) -> None:
    """The preprocessing ``pretrained_cfg`` records, checked where it is read (a bad one failed later, in
    ``resolve_data_config`` or an evaluation, naming neither the file nor the field)."""
    if not isinstance(cfg, dict):
        raise FoldedSpecError(f"{where}: pretrained_cfg must be a JSON object, got {type(cfg).__name__}")

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    size = cfg.get("input_size")
    if size is not None and not (isinstance(size, list | tuple) and len(size) == 3 and all(whole(v) for v in size)):
        raise FoldedSpecError(f"{where}: pretrained_cfg.input_size must be [channels, height, width] (positive whole "
                              f"numbers), got {size!r}")
    channels = size[0] if size is not None else None
    for name in ("mean", "std"):
        value = cfg.get(name)
        if value is None:
            continue
        if not (isinstance(value, list | tuple) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                         for v in value) and len(value) in (1, channels or len(value))):
            raise FoldedSpecError(f"{where}: pretrained_cfg.{name} must be one number per input channel"
                                  f"{f' ({channels})' if channels else ''}, got {value!r}")
        if name == "std" and any(v <= 0 for v in value):
            raise FoldedSpecError(f"{where}: pretrained_cfg.std must be positive, got {value!r}")


def shape_mismatches(net: nn.Module, saved: dict[str, tuple[int, ...]], skip: tuple[str, ...] = ()) -> list[str]:
    """``name: shape`` for each tensor of ``net`` (built on the meta device: nothing allocated) that a weights file
    (``saved``: name → shape) lacks or holds in another shape, leaving out the names starting with ``skip``."""
    return [f"{k}: {tuple(t.shape)} in config.json, {saved.get(k)} in the weights" for k, t in net.state_dict().items()
            if not k.startswith(skip) and saved.get(k) != tuple(t.shape)]


def non_finite(state: dict) -> list[str]:
    """Names of the float tensors of ``state`` holding NaN or infinite values."""
    return [k for k, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta
            and not bool(torch.isfinite(t).all())]


class LayerFoldedNet(nn.Module):
    """A folded CNN with timm's model interface (``forward_features``, ``forward_head``, ``reset_classifier``)."""

    def __init__(self, features: list[dict], pre_logits: list[dict] | None = None, num_classes: int = 1000,
                 num_features: int = 0, head_hidden_size: int | None = None, global_pool: str = "avg",
                 drop_rate: float = 0.0, in_chans: int = 3, layerfold: dict | None = None, **kwargs) -> None:
        super().__init__()
        check_format(layerfold)
        if not isinstance(features, list | tuple) or not all(isinstance(f, dict) for f in features):
            raise FoldedSpecError("config.json model_args.features must be a list of layer specs (JSON objects)")
        for name, value, low in (("num_classes", num_classes, 0), ("num_features", num_features, 0),
                                 ("in_chans", in_chans, 1)):
            if not _whole(value, low):
                raise FoldedSpecError(f"config.json {name} must be a whole number >= {low}, got {value!r}")
        if head_hidden_size is not None and not _whole(head_hidden_size, 1):
            raise FoldedSpecError(f"config.json model_args.head_hidden_size must be a positive whole number or null, "
                                  f"got {head_hidden_size!r}")
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, int | float) or not 0 <= drop_rate < 1:
            raise FoldedSpecError(f"config.json model_args.drop_rate must be a number in [0, 1), got {drop_rate!r}")
        if global_pool not in ("", "avg", "max", "avgmax", "catavgmax", "fast", "fastavg", "fastmax", "fastavgmax",
                               "fastcatavgmax"):  # (timm's SelectAdaptivePool2d asserts on others)
            raise FoldedSpecError(f"config.json global_pool {global_pool!r} is not a timm pool type")
        numel = spec_numel(list(features)) + spec_numel(list(pre_logits or []))
        if numel > MAX_SPEC_PARAMS:
            raise FoldedSpecError(f"config.json model_args describe convs with {numel:,} parameters "
                                  f"({numel * 4 / 2**30:.1f} GiB as float32), more than any folded CNN this "
                                  f"loader expects ({MAX_SPEC_PARAMS:,}; set HF_LAYERFOLD_MAX_PARAMS to allow more): "
                                  "a corrupt or hostile spec")
        features = _taking_channels(list(features), in_chans)
        self.model_args = dict(features=features, pre_logits=list(pre_logits or []), num_classes=num_classes,
                               num_features=num_features, head_hidden_size=head_hidden_size,
                               global_pool=global_pool, drop_rate=drop_rate, in_chans=in_chans)
        self.layerfold_info = layerfold or {}
        self.num_classes = num_classes
        self.num_features = num_features
        self.head_hidden_size = head_hidden_size or num_features
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.features = build_sequence(features, "features")
        self.pre_logits = build_sequence(pre_logits or [], "pre_logits")
        self._set_head(global_pool, num_classes)
        self.grad_checkpointing = False

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, refusing NaN or infinite weights (timm's loader and ``from_pretrained``
        come through here; transformers' ``from_pretrained`` does not): such a net outputs NaN for every image."""
        bad = non_finite(state_dict)
        if bad:
            more = " and more" if len(bad) > 5 else ""
            raise ValueError(f"the weights hold NaN or infinite values in {bad[:5]}{more}: the folded net would "
                             "output NaN")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _set_head(self, global_pool: str, num_classes: int) -> None:
        """Pooling, flatten and classifier as timm builds them: the pool flattens when the classifier follows it
        directly (no ``pre_logits`` convs), never when it passes through (``''``: the feature map comes out); the
        classifier takes what the pool gives (``catavgmax`` doubles it) or what the ``pre_logits`` convs give."""
        pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool) and not len(self.pre_logits))
        head_in = head_conv_width(self.model_args["pre_logits"])
        if head_in is not None and self.num_features and head_in != self.num_features * pool.feat_mult():
            # (as timm's MobileNetV3.reset_classifier: a model built with catavgmax has its head conv sized for
            # the doubled width, and keeps it; only a change of width is refused)
            raise ValueError(f"global_pool={global_pool!r} pools {self.num_features} features to "
                             f"{self.num_features * pool.feat_mult()} ({pool.feat_mult()}x), but this folded net's "
                             f"head conv (pre_logits) takes {head_in}: the pooling cannot change the pooled width")
        self.global_pool = pool
        self.flatten = nn.Flatten(1) if len(self.pre_logits) and global_pool else nn.Identity()
        if not len(self.pre_logits) and self.num_features:
            self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        like = next(self.features.parameters(), None)  # a new head on the net's device and dtype, as timm's
        kw = {} if like is None or like.device.type == "meta" else {"device": like.device, "dtype": like.dtype}
        self.classifier = nn.Linear(self.head_hidden_size, num_classes, **kw) if num_classes > 0 else nn.Identity()
        self.classifier.train(self.training)

    def __prepare_scriptable__(self):
        """``torch.jit.script`` cannot compile the input-size-dependent padding of merged convs or the head; say
        what works instead of failing deep inside TorchScript."""
        raise RuntimeError("a LayerFoldedNet cannot be compiled with torch.jit.script; use torch.export.export or "
                           "torch.compile (torch.jit.trace works too, but torch deprecates TorchScript)")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """As timm models do (timm's ``--grad-checkpointing``, transformers' ``gradient_checkpointing_enable``)."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pool = self.global_pool
        if (type(pool) is SelectAdaptivePool2d and pool.pool_type == "avg" and isinstance(pool.flatten, nn.Flatten)
                and not self.pre_logits):
            # the usual head, without its five module calls: they cost ~1 % of a batch-1 GPU forward
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        else:
            x = self.flatten(self.pre_logits(pool(x)))
        if self.drop_rate > 0.0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self._set_head(global_pool, num_classes)  # (first: a refused pooling leaves the net as it was)
        self.num_classes = num_classes
        self.model_args.update(num_classes=num_classes, global_pool=global_pool)
