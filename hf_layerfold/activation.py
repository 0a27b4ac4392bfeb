"""The learnable-linear activation that Layer Folding puts at every candidate site."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


def _not_inplace(act: nn.Module) -> nn.Module:
    """The input is needed after the activation runs (for ``α·x``), so an in-place activation must not own it."""
    act = copy.deepcopy(act)
    for m in act.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return act


class FoldableActivation(nn.Module):
    """``(1 − α)·act(x) + α·x`` with one scalar α per site.

    α = 0 is the original activation, α = 1 the identity. After a plan is applied, α is frozen at exactly
    0 or 1 and the forward takes the matching shortcut, so a planned model costs nothing extra.
    """

    def __init__(self, act: nn.Module, site: str, alpha_init: float = 0.0) -> None:
        super().__init__()
        self.act = _not_inplace(act)
        self.site = site
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.fixed: str | None = None  # None while searching; "linear" or "nonlinear" once planned
        self._is_relu = type(self.act) is nn.ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed == "linear":
            return x
        if self.fixed == "nonlinear":
            return self.act(x)
        if self._is_relu:  # (1-α)·relu(x) + α·x is a PReLU with one shared slope: one fused kernel each way
            return F.prelu(x, self.alpha.to(x.dtype).reshape(1))
        return torch.lerp(self.act(x), x, self.alpha.to(x.dtype))

    def fix(self, linear: bool) -> None:
        """Freeze α at exactly 1 (linear) or 0 (the original activation)."""
        with torch.no_grad():
            self.alpha.fill_(1.0 if linear else 0.0)
        self.alpha.requires_grad_(False)
        self.fixed = "linear" if linear else "nonlinear"

    @property
    def is_linear(self) -> bool:
        return self.fixed == "linear"

    def extra_repr(self) -> str:
        fixed = f", fixed={self.fixed}" if self.fixed else ""
        return f"site={self.site!r}, alpha={float(self.alpha.detach()):.4f}{fixed}"
