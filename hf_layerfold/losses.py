"""The loss terms of Layer Folding training: the α regularizer and knowledge distillation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def alpha_regularizer(alphas: Sequence[torch.Tensor], kind: str = "paper",
                      weights: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """Penalty that is zero when every α is 1 (every site linear), summed over sites (each times its ``weights``
    entry when given: ``LayerFoldingConfig.regularizer_weights``).

    ``"paper"`` is Σ|1 − α²| (Ben Dror et al.); its gradient vanishes at α = 0, so sites only start moving
    once the task loss (or a non-zero ``alpha_init``) has lifted α. ``"l1"`` is Σ(1 − α), a constant push.
    """
    if not alphas:
        raise ValueError("no α parameters: the model has no foldable site")
    a = torch.stack([alpha.float() for alpha in alphas])
    if kind == "paper":
        per_site = (1.0 - a * a).abs()
    elif kind == "l1":
        per_site = 1.0 - a
    else:
        raise ValueError(f"unknown regularizer {kind!r}; supported: 'paper', 'l1'")
    if weights is None:
        return per_site.sum()
    w = torch.as_tensor(weights, dtype=per_site.dtype, device=per_site.device)
    if w.shape != per_site.shape:
        raise ValueError(f"got {w.numel()} regularizer weights for {per_site.numel()} sites")
    return (per_site * w).sum()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) on temperature-softened distributions, times T² (Hinton et al.).

    The T² factor keeps the gradient scale independent of T, so ``distill_weight`` means the same at any T.
    """
    t = float(temperature)
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)


@torch.no_grad()
def clamp_alphas_(alphas: Sequence[torch.Tensor]) -> None:
    """Keep every α in [0, 1] (outside it the blend extrapolates and the plan threshold loses meaning)."""
    alphas = list(alphas)
    if alphas:  # two multi-tensor kernels rather than one per site
        torch._foreach_clamp_min_(alphas, 0.0)
        torch._foreach_clamp_max_(alphas, 1.0)


@torch.no_grad()
def clamp_schedule_free_alphas_(optimizer: torch.optim.Optimizer, alphas: Sequence[torch.Tensor]) -> None:
    """Keep a schedule-free optimizer's other points of each α in [0, 1] too (``optim="schedule_free_*"``).

    Such an optimizer holds α as y (the parameter while training), z (its state) and x, the point ``evaluate``
    and ``predict`` use after ``optimizer.eval()``: y = lerp(x, z, 1 − β). Clamping y alone let z run past 1
    under the regularizer's push, and x (derived from y and z) fell back below 1 and then out of [0, 1]. Here x and
    z are clamped and y rebuilt from them, for α only (a round trip through ``eval()`` / ``train()`` would move
    every weight by rounding)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # (accelerate's AcceleratedOptimizer)
    groups = [g for g in getattr(inner, "param_groups", ()) if g.get("train_mode", False)]  # (none: not schedule-free)
    state = getattr(inner, "state", None)
    if not groups or not state:
        return
    ids = {id(a) for a in alphas}
    for group in groups:
        beta = group["betas"][0] if "betas" in group else group.get("momentum")
        if not beta:
            continue
        for p in group["params"]:
            z = state[p].get("z") if id(p) in ids and p in state else None
            if z is not None:
                x = torch.lerp(p, z, 1 - 1 / beta).clamp_(0.0, 1.0)  # the eval point, as optimizer.eval() sets it
                z.clamp_(0.0, 1.0)
                p.copy_(torch.lerp(x, z, 1 - beta))  # y, as optimizer.train() sets it
