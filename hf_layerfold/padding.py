"""Padding rules of convs and of merged runs of convs.

Exact folding needs the zero padding of a run of convs moved in front of its first conv: the merged
conv then sees the same zeros the run sees. A ``PadRule`` describes one conv's padding (static, or
TF-"same" computed from the input size); ``chain_padding`` gives the single front padding of a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

Pads = tuple[int, int, int, int]  # left, right, top, bottom (F.pad order)


def _nonneg(v):
    """``max(v, 0)`` for an int (symbolic ones included) or a traced size tensor (``torch.jit.trace``)."""
    return v.clamp(min=0) if isinstance(v, torch.Tensor) else max(v, 0)


@dataclass(frozen=True)
class PadRule:
    """How one conv pads its input. ``static`` is ``None`` for TF-'same' padding that depends on input size."""

    kernel: tuple[int, int]  # effective (dilated) kernel
    stride: tuple[int, int]
    static: Pads | None

    def pads(self, height: int, width: int) -> Pads:
        if self.static is not None:
            return self.static
        # integer ops only, a traced or exported model then pads for any input size; ceil(h / s) as (h + s - 1) // s
        # on non-negative numbers, where floor and truncation agree: ONNX divides by truncating, so -(-h // s) gave
        # ceil(65 / 2) = 32 in an exported model
        ph = _nonneg(((height + self.stride[0] - 1) // self.stride[0] - 1) * self.stride[0] + self.kernel[0] - height)
        pw = _nonneg(((width + self.stride[1] - 1) // self.stride[1] - 1) * self.stride[1] + self.kernel[1] - width)
        return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        left, right, top, bottom = self.pads(height, width)
        return ((height + top + bottom - self.kernel[0]) // self.stride[0] + 1,
                (width + left + right - self.kernel[1]) // self.stride[1] + 1)

    @property
    def is_static(self) -> bool:
        return self.static is not None

    def to_dict(self) -> dict:
        return {"k": list(self.kernel), "s": list(self.stride),
                "pad": list(self.static) if self.static is not None else "same"}

    @classmethod
    def from_dict(cls, d: dict) -> PadRule:
        pad = d["pad"]
        return cls(tuple(d["k"]), tuple(d["s"]), None if pad == "same" else tuple(pad))


def effective_kernel(conv: nn.Conv2d) -> tuple[int, int]:
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    return dh * (kh - 1) + 1, dw * (kw - 1) + 1


def pad_rule_of(conv: nn.Conv2d) -> PadRule:
    """Read the padding behaviour of a torch / timm conv (timm's ``Conv2dSame`` pads dynamically)."""
    from timm.layers.conv2d_same import Conv2dSame

    from .layers import PaddedConv2d

    if isinstance(conv, PaddedConv2d):
        raise ValueError("conv already has moved padding; apply a plan only once")
    kernel, stride = effective_kernel(conv), tuple(conv.stride)
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r} cannot be folded (only 'zeros')")
    if isinstance(conv, Conv2dSame):
        static = PadRule(kernel, stride, None)
        if stride == (1, 1):  # 'same' with stride 1 does not depend on the input size
            static = PadRule(kernel, stride, static.pads(kernel[0], kernel[1]))
        return static
    if conv.padding == "valid":
        return PadRule(kernel, stride, (0, 0, 0, 0))
    if conv.padding == "same":
        ph, pw = kernel[0] - 1, kernel[1] - 1
        return PadRule(kernel, stride, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    ph, pw = conv.padding
    return PadRule(kernel, stride, (pw, pw, ph, ph))


def chain_padding(rules: list[PadRule], height: int, width: int) -> Pads:
    """Front padding that makes a run of unpadded convs see what the padded run saw at every border.

    Layer i's padding counts in input pixels scaled by the stride of all layers before it.
    """
    left = right = top = bottom = 0
    sh = sw = 1
    for rule in rules:
        pl, pr, pt, pb = rule.pads(height, width)
        left, right, top, bottom = left + sw * pl, right + sw * pr, top + sh * pt, bottom + sh * pb
        height, width = rule.out_size(height, width)
        sh, sw = sh * rule.stride[0], sw * rule.stride[1]
    return left, right, top, bottom


def static_chain_padding(rules: list[PadRule]) -> Pads | None:
    """The run's front padding if it does not depend on the input size, else ``None``."""
    if not all(r.is_static for r in rules):
        return None
    return chain_padding(rules, 1 << 12, 1 << 12)
