"""Triton kernels of :mod:`hf_layerfold.triton_blend` (imported only when they are first needed).

Only core builtins and kernels defined here are used: triton's own ``@jit`` helpers (``tl.zeros``, ``tl.sum``) are
fixed to the interpreter setting at which triton was imported, which would tie the interpreter tests to import order.
"""

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def blend_forward(x_ptr, y_ptr, alpha_ptr, bounds_ptr, n, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """``y = c + α·(x − c)`` with ``c = clamp(x, lo, hi)``: one read, one write."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(COMPUTE)
    a = tl.load(alpha_ptr).to(COMPUTE)
    c = tl.minimum(tl.maximum(x, tl.load(bounds_ptr)), tl.load(bounds_ptr + 1))
    tl.store(y_ptr + offs, (c + a * (x - c)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def blend_backward(g_ptr, x_ptr, gx_ptr, partial_ptr, alpha_ptr, bounds_ptr, n, BLOCK: tl.constexpr,
                   TILES: tl.constexpr, COMPUTE: tl.constexpr):
    """``∂L/∂x = g`` inside ``(lo, hi)``, ``α·g`` outside; ``partial[program] = Σ g·(x − c)`` over its tiles."""
    lo = tl.load(bounds_ptr)
    hi = tl.load(bounds_ptr + 1)
    a = tl.load(alpha_ptr).to(COMPUTE)
    acc = tl.full([BLOCK], 0, COMPUTE)
    start = tl.program_id(0).to(tl.int64) * (BLOCK * TILES)
    for t in range(TILES):
        offs = start + t * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0).to(COMPUTE)
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(COMPUTE)
        c = tl.minimum(tl.maximum(x, lo), hi)
        inside = (x > lo) & (x < hi)  # the clamp's own gradient is 0 on the bounds, as torch's hardtanh
        tl.store(gx_ptr + offs, tl.where(inside, g, a * g).to(gx_ptr.dtype.element_ty), mask=mask)
        acc += g * (x - c)
    tl.store(partial_ptr + tl.program_id(0), tl.reduce(acc, 0, _add))
