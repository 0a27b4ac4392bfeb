"""Small modules used by planned and folded models, and the activation registry used to rebuild them."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import activations as timm_act
from timm.layers import activations_me as timm_act_me

from .padding import PadRule, Pads, chain_padding, static_chain_padding


def _run_pad(x: torch.Tensor, rules: tuple) -> torch.Tensor:
    """``x`` padded by the front padding of a run of convs whose padding depends on the input size. A leaf for
    ``torch.fx`` (``torch.fx.wrap`` below): symbolic tracing (torchvision's and timm's ``create_feature_extractor``,
    FX quantization) records this call instead of failing on the size arithmetic. ``rules``: ``PadRule`` fields as
    plain tuples, which FX can record as arguments."""
    return F.pad(x, chain_padding([PadRule(*r) for r in rules], x.shape[-2], x.shape[-1]))


torch.fx.wrap("_run_pad")

# a module's hook registries (torch.nn.Module attributes); with their flags, what a PaddedConv2d takes over
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_STATE = (*HOOK_DICTS, "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs", "_is_full_backward_hook")


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks registered on it (forward, pre-forward, backward)."""
    return any(getattr(module, name, None) for name in HOOK_DICTS)


class PaddedConv2d(nn.Conv2d):
    """A conv that pads its input with the front padding of a run of convs, then convolves unpadded.

    Used for the first conv of a merged run in a planned model (the run's other convs get no padding) and
    for merged convs whose padding is asymmetric or input-size dependent in a folded model.
    """

    def __init__(self, *args, pad_rules: list[PadRule] | None = None, **kwargs) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)
        self.pad_rules = list(pad_rules or [])
        self.static_pads: Pads | None = static_chain_padding(self.pad_rules)
        self._init_pad_cache()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, pad_rules: list[PadRule]) -> PaddedConv2d:
        """Wrap an existing conv, sharing its Parameter objects (optimizers keep working) and its hooks."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(new, name, getattr(conv, name))
        new.padding = (0, 0)
        new.weight = conv.weight
        new.bias = conv.bias
        new.pad_rules = list(pad_rules)
        new.static_pads = static_chain_padding(new.pad_rules)
        new._init_pad_cache()
        new.train(conv.training)
        for name in _HOOK_STATE:  # the same dict objects: hooks keep firing and their handles still remove them
            if hasattr(conv, name):
                setattr(new, name, getattr(conv, name))
        return new

    def _init_pad_cache(self) -> None:
        self._static_padding = None if self.static_pads is None else self._split_pads(self.static_pads)
        self._padding_by_size: dict[tuple[int, int], tuple[Pads | None, tuple[int, int]]] = {}

    @staticmethod
    def _split_pads(pads: Pads) -> tuple[Pads | None, tuple[int, int]]:
        """Symmetric front padding goes to the conv itself (no padded copy); anything else is an explicit pad."""
        left, right, top, bottom = pads
        if left == right and top == bottom:
            return None, (top, left)
        return pads, (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self._static_padding
        if split is None and isinstance(x, torch.fx.Proxy):  # FX symbolic tracing: the padding stays a graph call
            # (padding as a pair: FX quantization lowers this call to quantized::conv2d_prepack, which takes a list)
            return F.conv2d(_run_pad(x, tuple((r.kernel, r.stride, r.static) for r in self.pad_rules)), self.weight,
                            self.bias, self.stride, (0, 0), self.dilation, self.groups)
        if split is None and (torch.jit.is_tracing() or torch.compiler.is_exporting()):
            # traced sizes are tensors, exported ones symbolic: no cache, and the padding stays a function of x
            return F.conv2d(F.pad(x, chain_padding(self.pad_rules, *x.shape[-2:])), self.weight, self.bias,
                            self.stride, 0, self.dilation, self.groups)
        if split is None:  # input-size dependent (TF 'same'): computed once per size
            size = (x.shape[-2], x.shape[-1])
            split = self._padding_by_size.get(size)
            if split is None:
                split = self._padding_by_size[size] = self._split_pads(chain_padding(self.pad_rules, *size))
        pads, conv_padding = split
        if pads is not None:
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, conv_padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", run_padding={self.static_pads or 'dynamic'}"


class Residual(nn.Module):
    """``branch(x) + shortcut(x)``; an absent shortcut is the identity."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + (x if self.shortcut is None else self.shortcut(x))


# Activations a folded model can keep, by a stable name. Each maps back to the exact class it was made of.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid, "tanh": nn.Tanh, "mish": nn.Mish,
    "prelu": nn.PReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "hardtanh": nn.Hardtanh,
    "timm_swish": timm_act.Swish, "timm_hard_swish": timm_act.HardSwish,
    "timm_hard_sigmoid": timm_act.HardSigmoid, "timm_sigmoid": timm_act.Sigmoid,
    "timm_gelu": timm_act.GELU, "timm_mish": timm_act.Mish, "timm_hard_mish": timm_act.HardMish,
    "timm_tanh": timm_act.Tanh,
    # what timm.create_model(..., act_layer=NAME) builds for "gelu_tanh", "quick_gelu", "selu", "celu", "hard_mish"
    "timm_gelu_tanh": timm_act.GELUTanh, "timm_quick_gelu": timm_act.QuickGELU, "selu": nn.SELU, "celu": nn.CELU,
    "timm_hard_mish_me": timm_act_me.HardMishMe,
}
_NAME_OF = {cls: name for name, cls in ACTIVATIONS.items()}


def activation_spec(module: nn.Module) -> dict:
    """A JSON spec of an activation module; unknown classes raise with the supported list."""
    name = _NAME_OF.get(type(module))
    if name is None:
        raise ValueError(f"cannot serialize activation {type(module).__name__}; "
                         f"supported: {sorted(c.__name__ for c in _NAME_OF)}")
    spec: dict = {"type": "act", "name": name}
    if isinstance(module, nn.GELU) and module.approximate != "none":
        spec["approximate"] = module.approximate
    if isinstance(module, nn.LeakyReLU):
        spec["negative_slope"] = module.negative_slope
    if isinstance(module, nn.ELU | nn.CELU):
        spec["alpha"] = module.alpha
    if isinstance(module, nn.PReLU):
        spec["num_parameters"] = module.num_parameters
    if type(module) is nn.Hardtanh:
        spec["min_val"], spec["max_val"] = float(module.min_val), float(module.max_val)
    return spec


def build_activation(spec: dict) -> nn.Module:
    kwargs = {k: v for k, v in spec.items() if k not in ("type", "name")}
    try:
        return ACTIVATIONS[spec["name"]](**kwargs)
    except KeyError:
        raise ValueError(f"unknown activation {spec['name']!r}; supported: {sorted(ACTIVATIONS)}") from None


def is_activation(module: nn.Module) -> bool:
    return type(module) in _NAME_OF
