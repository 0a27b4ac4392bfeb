"""The clamp blend on CUDA as one hand-written Triton kernel each way (``blend="auto"`` or ``"triton"``).

timm runs ReLU6 in place: one read and one write forward, one pass backward. The blend keeps its input for the
backward and needs α's gradient, a reduction over the whole tensor; as separate PyTorch ops that costs several extra
passes per site. These kernels move exactly the bytes the in-place activation moves: forward reads ``x`` and writes
``y``; backward reads ``g`` and ``x``, writes ``∂L/∂x`` and reduces ``Σ g·(x − clamp(x))`` in registers to one partial
sum per program (summed afterwards, so the result is deterministic).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch
from torch.autograd.function import once_differentiable

BLOCK = 1024  # elements per tile
TILES = 8  # tiles per backward program: fewer partial sums to add up


@functools.cache
def triton_available() -> bool:
    """Triton is importable and a CUDA device of compute capability ≥ 7.0 is present (what Triton supports)."""
    return (torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
            and torch.cuda.get_device_capability() >= (7, 0))


def build_kernels() -> tuple:
    """Freshly decorated Triton kernels ``(forward, backward)``: decoration reads ``TRITON_INTERPRET``, so the
    tests can get interpreter-mode kernels (CPU tensors, float64) whatever was imported before."""
    from . import _triton_kernels

    module = importlib.reload(_triton_kernels)
    return module.blend_forward, module.blend_backward


def direct_launchers(kernels: tuple, **options) -> tuple:
    """``(forward, backward)`` wrapped in :class:`~hf_layerfold.triton_launch.DirectLaunch`, each told which of its
    arguments it writes (forward: ``y``; backward: ``∂L/∂x`` and the partial sums); ``options`` go to each."""
    from .triton_launch import DirectLaunch

    forward, backward = kernels
    return DirectLaunch(forward, outputs=(1,), **options), DirectLaunch(backward, outputs=(2, 3), **options)


@functools.cache
def _kernels() -> tuple:
    """The kernels as the sites launch them: straight through the compiled kernel's launcher where that was checked
    to give what Triton's JIT gives, when switched on (:mod:`~hf_layerfold.triton_launch`)."""
    return direct_launchers(build_kernels())


def direct_launch_state() -> dict | None:
    """Per kernel, how many argument combinations launch directly, or ``"off"``; ``None`` before any launch (for
    the benchmarks' records)."""
    if _kernels.cache_info().currsize == 0:
        return None
    return {name: len(k.direct) if k.enabled else "off" for name, k in zip(("forward", "backward"), _kernels())}


def _dense(t: torch.Tensor) -> torch.Tensor:
    """The kernels walk the storage flat: fine for any layout without gaps (NCHW or channels_last)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


@functools.cache
def _compute_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a model on ``cuda:1`` without set_device).
    Entering ``torch.cuda.device`` swaps the device twice, host time paid at every site, so only when needed."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class TritonClampBlend(torch.autograd.Function):
    """``c + α·(x − c)`` with ``c = clamp(x, lo, hi)``; ``bounds`` is ``[lo, hi]`` in the compute dtype (float32,
    float64 for float64 ``x``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, bounds: torch.Tensor, kernels: tuple | None = None):
        kernels = kernels or _kernels()
        x = _dense(x)
        y = torch.empty_like(x)
        n = x.numel()
        with _on_device(x):
            kernels[0][(_cdiv(n, BLOCK),)](x, y, alpha, bounds, n, BLOCK=BLOCK,
                                                COMPUTE=_compute_dtype(x.dtype))
        ctx.save_for_backward(x, alpha, bounds)
        ctx.kernels = kernels
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' outputs must refuse a second backward
            return _backward_once(ctx, grad)
        return _backward(ctx, grad)


def _backward(ctx, grad: torch.Tensor) -> tuple:
    """The backward kernel. Runs at every site in every step, so the host work around it is kept to the calls that
    are needed (no ``once_differentiable`` wrapper outside ``create_graph``, no no-op conversions)."""
    x, alpha, bounds = ctx.saved_tensors
    if grad.stride() != x.stride():  # same flat order as x, element for element
        grad = torch.empty_like(x).copy_(grad)
    n = x.numel()
    programs = _cdiv(n, BLOCK * TILES)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_x = torch.empty_like(x)
    partial = torch.empty(programs, dtype=compute, device=x.device)
    with _on_device(x):
        ctx.kernels[1][(programs,)](grad, x, grad_x, partial, alpha, bounds, n, BLOCK=BLOCK, TILES=TILES,
                                    COMPUTE=_compute_dtype(x.dtype))
    grad_alpha = None
    if ctx.needs_input_grad[1]:
        grad_alpha = partial.sum()
        if grad_alpha.dtype != alpha.dtype or alpha.dim():
            grad_alpha = grad_alpha.to(alpha.dtype).reshape(alpha.shape)
    return (grad_x if ctx.needs_input_grad[0] else None), grad_alpha, None, None


_backward_once = once_differentiable(_backward)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_clamp_blend(x: torch.Tensor, alpha: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"blend='triton' needs CUDA tensors (got a {x.device.type} tensor); use blend='auto', "
                           "which takes the Triton kernels on CUDA and the eager blend elsewhere")
    return TritonClampBlend.apply(x, alpha, bounds)
