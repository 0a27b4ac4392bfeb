"""Folding math as small pure functions on tensors.

Every function takes and returns plain tensors (weights ``(out, in/groups, kh, kw)``, biases ``(out,)``) so
each rule can be tested alone in float64. Nothing here knows about modules or models.
"""

from __future__ import annotations

import torch
from torch import Tensor

Pair = tuple[int, int]


def fuse_bn(weight: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float,
            gamma: Tensor | None, beta: Tensor | None) -> tuple[Tensor, Tensor]:
    """Fold an inference-mode BatchNorm that follows a conv into the conv's weight and bias."""
    gamma = torch.ones_like(mean) if gamma is None else gamma
    beta = torch.zeros_like(mean) if beta is None else beta
    bias = torch.zeros_like(mean) if bias is None else bias
    scale = gamma / torch.sqrt(var + eps)
    return weight * scale.reshape(-1, 1, 1, 1), (bias - mean) * scale + beta


def dilate_kernel(weight: Tensor, dilation: Pair) -> Tensor:
    """Write a dilated kernel as an ordinary (larger, sparse) kernel so it can be merged like any other."""
    dh, dw = dilation
    if dh == 1 and dw == 1:
        return weight
    o, i, kh, kw = weight.shape
    out = weight.new_zeros(o, i, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    out[:, :, ::dh, ::dw] = weight
    return out


def grouped_to_dense(weight: Tensor, groups: int) -> Tensor:
    """Embed a grouped (or depthwise) kernel into a dense one: block-diagonal over the channel groups."""
    _check_kernel(weight, groups, "grouped_to_dense")
    if groups == 1:
        return weight
    out_ch, in_per_group, kh, kw = weight.shape
    out_per_group = out_ch // groups
    dense = weight.new_zeros(out_ch, in_per_group * groups, kh, kw)
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group:(g + 1) * in_per_group] = weight[rows]
    return dense


def merged_kernel_size(k1: Pair, s1: Pair, k2: Pair) -> Pair:
    """Kernel of a stride-``s1`` ``k1`` conv followed by a ``k2`` conv: ``k1 + s1·(k2 − 1)`` per axis."""
    return k1[0] + s1[0] * (k2[0] - 1), k1[1] + s1[1] * (k2[1] - 1)


def is_depthwise(out_channels: int, in_per_group: int, groups: int) -> bool:
    return in_per_group == 1 and groups == out_channels


def composed_groups(out1: int, in_per_group1: int, g1: int, out2: int, in_per_group2: int, g2: int) -> int:
    """Groups of conv1 (``out1`` channels, ``g1`` groups) followed by conv2 once ``compose_convs`` merges them."""
    if is_depthwise(out2, in_per_group2, g2) and out2 == out1:
        return g1  # a depthwise conv after keeps conv1's grouping
    if is_depthwise(out1, in_per_group1, g1):
        return g2  # a depthwise conv before takes conv2's grouping
    return g1 if g1 == g2 else 1  # the same grouping is kept; otherwise both are densified


def _check_kernel(weight: Tensor, groups: int, where: str) -> None:
    """A conv kernel ``(out, in/groups, kh, kw)`` whose ``groups`` divides its output channels."""
    if weight.dim() != 4:
        raise ValueError(f"{where}: a conv kernel is (out, in/groups, kh, kw), got shape {tuple(weight.shape)}")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"{where}: groups={groups} does not divide the kernel's {weight.shape[0]} output channels")


def _pair(value: int | Pair, name: str) -> Pair:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
    return pair


def compose_convs(w1: Tensor, b1: Tensor | None, s1: Pair | int, g1: int,
                  w2: Tensor, b2: Tensor | None, g2: int) -> tuple[Tensor, Tensor, int]:
    """Merge conv1 (stride ``s1``) followed by conv2 into one conv, assuming no padding between them.

    The result has stride ``s1·s2`` (the caller multiplies strides) and kernel ``merged_kernel_size``; its groups
    follow ``composed_groups`` (a depthwise conv on either side keeps the other's grouping, the same grouping is
    kept, anything else is densified first). A bias may be ``None`` (a conv without one). Returns
    ``(weight, bias, groups)``.
    """
    _check_kernel(w1, g1, "compose_convs: conv1")
    _check_kernel(w2, g2, "compose_convs: conv2")
    if w2.shape[1] * g2 != w1.shape[0]:
        raise ValueError(f"compose_convs: conv2 takes {w2.shape[1] * g2} input channels ({g2} groups of "
                         f"{w2.shape[1]}), but conv1 gives {w1.shape[0]} (kernels {tuple(w1.shape)} then "
                         f"{tuple(w2.shape)})")
    s1 = _pair(s1, "compose_convs: s1")
    b1 = w1.new_zeros(w1.shape[0]) if b1 is None else b1
    b2 = w2.new_zeros(w2.shape[0]) if b2 is None else b2
    for name, b, w in (("b1", b1, w1), ("b2", b2, w2)):
        if b.shape != (w.shape[0],):
            raise ValueError(f"compose_convs: {name} has shape {tuple(b.shape)}; its conv has {w.shape[0]} "
                             "output channels")
    if is_depthwise(w2.shape[0], w2.shape[1], g2) and w2.shape[0] == w1.shape[0]:
        return _compose_then_depthwise(w1, b1, s1, g1, w2, b2)
    if is_depthwise(w1.shape[0], w1.shape[1], g1):
        return _compose_depthwise_then(w1, b1, s1, w2, b2, g2)
    if g1 != g2:
        w1, w2, g1, g2 = grouped_to_dense(w1, g1), grouped_to_dense(w2, g2), 1, 1
    g = g1
    c1, c0g, k1h, k1w = w1.shape
    c2, c1g, k2h, k2w = w2.shape
    kh, kw = merged_kernel_size((k1h, k1w), s1, (k2h, k2w))
    # Per-group views: w1 (g, c1/g, c0/g, k1), w2 (g, c2/g, c1/g, k2).
    w1g = w1.reshape(g, c1 // g, c0g, k1h, k1w)
    w2g = w2.reshape(g, c2 // g, c1g, k2h, k2w)
    out = w1.new_zeros(g, c2 // g, c0g, kh, kw)
    for jy in range(k2h):
        for jx in range(k2w):
            tap = torch.einsum("gom,gmikl->goikl", w2g[:, :, :, jy, jx], w1g)
            y, x = s1[0] * jy, s1[1] * jx
            out[:, :, :, y:y + k1h, x:x + k1w] += tap
    bias = b2 + torch.einsum("gom,gm->go", w2g.sum(dim=(3, 4)), b1.reshape(g, c1 // g)).reshape(-1)
    return out.reshape(c2, c0g, kh, kw), bias, g


def _compose_then_depthwise(w1: Tensor, b1: Tensor, s1: Pair, g1: int,
                            w2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor, int]:
    """conv1 followed by a depthwise conv: each tap of conv2 scales conv1's output channels."""
    c1, c0g, k1h, k1w = w1.shape
    k2h, k2w = w2.shape[-2:]
    kh, kw = merged_kernel_size((k1h, k1w), s1, (k2h, k2w))
    out = w1.new_zeros(c1, c0g, kh, kw)
    for jy in range(k2h):
        for jx in range(k2w):
            y, x = s1[0] * jy, s1[1] * jx
            out[:, :, y:y + k1h, x:x + k1w] += w2[:, 0, jy, jx].reshape(-1, 1, 1, 1) * w1
    return out, b2 + w2.sum(dim=(1, 2, 3)) * b1, g1


def _compose_depthwise_then(w1: Tensor, b1: Tensor, s1: Pair,
                            w2: Tensor, b2: Tensor, g2: int) -> tuple[Tensor, Tensor, int]:
    """A depthwise conv followed by conv2: each input channel of conv2 sees one depthwise kernel."""
    c1, _, k1h, k1w = w1.shape
    c2, c1g, k2h, k2w = w2.shape
    kh, kw = merged_kernel_size((k1h, k1w), s1, (k2h, k2w))
    # The depthwise kernel feeding input m of output o: channel (group of o)·c1g + m.
    dw = w1[:, 0].reshape(g2, 1, c1g, k1h, k1w).expand(g2, c2 // g2, c1g, k1h, k1w).reshape(c2, c1g, k1h, k1w)
    out = w1.new_zeros(c2, c1g, kh, kw)
    for jy in range(k2h):
        for jx in range(k2w):
            y, x = s1[0] * jy, s1[1] * jx
            out[:, :, y:y + k1h, x:x + k1w] += w2[:, :, jy, jx, None, None] * dw
    b1g = b1.reshape(g2, 1, c1g).expand(g2, c2 // g2, c1g).reshape(c2, c1g)
    return out, b2 + (w2.sum(dim=(2, 3)) * b1g).sum(dim=1), g2


def add_shortcut_tap(weight: Tensor, groups: int, shortcut: Tensor | None, offset: Pair) -> tuple[Tensor, int]:
    """Add a parallel linear shortcut into a conv kernel at tap ``offset`` (the residual → identity tap).

    ``shortcut`` is the shortcut's own (dense) kernel, or ``None`` for the identity. It must fit inside the
    kernel at ``offset``; both paths must share stride and output size, which the caller checks.
    """
    out_ch, _, kh, kw = weight.shape
    sh, sw = (1, 1) if shortcut is None else shortcut.shape[-2:]
    if offset[0] < 0 or offset[1] < 0 or offset[0] + sh > kh or offset[1] + sw > kw:
        raise ValueError(f"shortcut kernel {sh}x{sw} at {offset} does not fit a {kh}x{kw} kernel")
    if shortcut is None:
        if weight.shape[1] * groups != out_ch:
            raise ValueError(f"an identity shortcut needs as many input as output channels; the conv maps "
                             f"{weight.shape[1] * groups} to {out_ch}: pass the projection's kernel as shortcut")
        if groups == out_ch and weight.shape[1] == 1:  # depthwise stays depthwise
            weight = weight.clone()
            weight[:, 0, offset[0], offset[1]] += 1
            return weight, groups
        shortcut = torch.eye(out_ch, dtype=weight.dtype, device=weight.device).reshape(out_ch, out_ch, 1, 1)
    weight = grouped_to_dense(weight, groups).clone()
    if shortcut.shape[:2] != weight.shape[:2]:
        raise ValueError(f"the shortcut kernel {tuple(shortcut.shape)} must be dense and map the conv's "
                         f"{weight.shape[1]} input channels to its {out_ch} outputs")
    weight[:, :, offset[0]:offset[0] + sh, offset[1]:offset[1] + sw] += shortcut
    return weight, 1
