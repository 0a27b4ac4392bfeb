"""``blend="compile"`` (and ``"auto"`` on CPU): BatchNorm and the α blend after it as one compiled region per step.

A searching site keeps its input and reduces over it for α's gradient, which costs extra passes over every
activation. timm puts most activations inside ``BatchNormAct2d``; compiling BatchNorm together with the blend lets
the compiler fuse the normalization, the blend and their backward into a few passes, so the α search costs about
what the plain eager step costs. One compiled function serves every site (shapes are symbolic); running statistics
are updated exactly as eager BatchNorm updates them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d
from torch.nn.modules import module as torch_module

from . import activation
from .activation import FoldableActivation, clamp_blend
from .layers import has_hooks


def _bn_blend(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor, momentum: float, eps: float, alpha: torch.Tensor,
              bounds: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm (batch statistics, running statistics updated in place) followed by the blend.

    Written with plain reductions rather than ``F.batch_norm`` so the channel count stays symbolic: one compiled
    graph then serves every site, where ``F.batch_norm`` got one graph per channel count."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
    n = x.numel() // x.shape[1]
    with torch.no_grad():
        running_mean.lerp_(mean.reshape(-1).to(running_mean.dtype), momentum)
        running_var.lerp_((var.reshape(-1) * (n / max(n - 1, 1))).to(running_var.dtype), momentum)
    scale = torch.rsqrt(var + eps) * weight.reshape(1, -1, 1, 1)
    y = (x - mean) * scale + bias.reshape(1, -1, 1, 1)
    return clamp_blend(y, alpha, bounds)


_compiled_bn_blend = None


def compiled_bn_blend(*args) -> torch.Tensor:
    global _compiled_bn_blend
    if _compiled_bn_blend is None:
        _compiled_bn_blend = torch.compile(_bn_blend, dynamic=True, fullgraph=True)
    return _compiled_bn_blend(*args)


def _runs_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own, or global module hooks) that the fused path skips."""
    return has_hooks(module) or bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                                     or torch_module._global_backward_hooks
                                     or torch_module._global_backward_pre_hooks)


class BatchNormBlend2d(BatchNormAct2d):
    """timm's ``BatchNormAct2d`` whose searching ``FoldableActivation`` runs fused with the BatchNorm.

    Same parameters, buffers and state-dict keys as the module it replaces; eval mode, a fixed plan, a drop layer
    between BatchNorm and the activation, an activation carrying hooks, anything under an outer ``torch.compile``,
    and ``blend="auto"`` wherever it does not compile (off the CPU, below ``AUTO_COMPILE_MIN_NUMEL`` elements, after
    a compiler failure; the activation then picks its own path) take timm's own forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act
        if (not self.training or not isinstance(act, FoldableActivation) or act.fixed is not None
                or torch.compiler.is_compiling() or (act.blend == "auto" and not activation.auto_compiles(x))
                or not self.track_running_stats or self.momentum is None
                or self.weight is None or self.bias is None or not isinstance(self.drop, nn.Identity)
                or x.numel() == x.shape[1]  # one value per channel: let BatchNorm raise its own error
                or _runs_hooks(act)):  # hooks registered on the site (as prepare_model advises) must fire
            return super().forward(x)
        if act.blend == "auto":
            eager = super().forward
            return activation.compiled_or_eager(lambda: self._compiled(x), lambda: eager(x))
        return self._compiled(x)

    def _compiled(self, x: torch.Tensor) -> torch.Tensor:
        # views, not Parameters: the compiler keeps a Parameter's shape static, which would pin the channel count
        y = compiled_bn_blend(x, self.running_mean, self.running_var, self.weight.view(-1), self.bias.view(-1),
                              self.momentum, self.eps, self.act.alpha, self.act._bounds_tensor)
        self.num_batches_tracked.add_(1)  # after the call: a compile failure must not count a batch twice
        return y


def fuse_batchnorm_blends(model: torch.nn.Module) -> int:
    """Turn every ``BatchNormAct2d`` that carries a clamp-type ``FoldableActivation`` (ReLU, ReLU6, Hardtanh) into a
    :class:`BatchNormBlend2d`, in place; returns how many. The module object stays the same (its class changes), so
    optimizers, hooks and parameter identities are untouched."""
    count = 0
    for module in model.modules():
        if (type(module) is BatchNormAct2d and isinstance(module.act, FoldableActivation)
                and getattr(module.act, "_bounds_tensor", None) is not None):
            module.__class__ = BatchNormBlend2d
            count += 1
    return count
