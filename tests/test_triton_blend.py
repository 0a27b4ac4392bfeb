"""The Triton blend kernels: float64 math on CPU through Triton's interpreter, then the real kernels on CUDA."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

import hf_layerfold as lf
from hf_layerfold.activation import ClampBlend
from hf_layerfold.triton_blend import TritonClampBlend, build_kernels

BOUNDS = [(0.0, 6.0), (0.0, math.inf), (-1.0, 2.0)]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reference(x, alpha, lo, hi):  # hardtanh: the gradient ReLU6 / ReLU have on their bounds (0 there)
    return torch.lerp(torch.nn.functional.hardtanh(x, lo, hi), x, alpha)


def _grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g)


@pytest.fixture(scope="module")
def _interpreted():
    pytest.importorskip("triton")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # read when the kernels are decorated
        yield build_kernels()


@pytest.fixture
def interpreted_kernels(_interpreted, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # and again when they run
    return _interpreted


@pytest.mark.parametrize("lo,hi", BOUNDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided_grad"])
def test_kernels_match_definition_float64(interpreted_kernels, lo, hi, layout):
    torch.manual_seed(0)
    shape = (2, 8, 30, 31)  # 14880 elements: several backward programs, a ragged last tile
    x = torch.randn(*shape, dtype=torch.float64) * 4
    x[0, 0, 0, :4] = torch.tensor([lo, hi if math.isfinite(hi) else 1.0, 0.0, -0.0], dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    for a in (0.0, 0.3, 1.0):
        alpha = torch.tensor(a, dtype=torch.float64, requires_grad=True)
        bounds = torch.tensor([lo, hi], dtype=torch.float64)
        y = TritonClampBlend.apply(x, alpha, bounds, interpreted_kernels)
        ref = _reference(x, alpha, lo, hi)
        g = torch.randn_like(ref)
        if layout == "strided_grad":
            g = g.transpose(1, 3).contiguous().transpose(1, 3)  # same values, other memory order
        assert y.stride() == x.stride()
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
        for got, want in zip(_grads(y, (x, alpha), g), _grads(ref, (x, alpha), g)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_direct_launch_wrappers_pass_the_launches_through(interpreted_kernels):
    """The sites launch through ``DirectLaunch`` (``_kernels()``); where it cannot go direct (here: CPU tensors in
    the interpreter), even switched on, it hands every launch to the kernel unchanged."""
    from hf_layerfold.triton_blend import direct_launchers

    wrapped = direct_launchers(interpreted_kernels, enabled=True)
    x = (torch.randn(2, 8, 6, 6, dtype=torch.float64) * 4).requires_grad_()
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    bounds = torch.tensor([0.0, 6.0], dtype=torch.float64)
    g = torch.randn_like(x)
    got, want = (TritonClampBlend.apply(x, alpha, bounds, k) for k in (wrapped, interpreted_kernels))
    assert torch.equal(got, want)
    for a, b in zip(_grads(got, (x, alpha), g), _grads(want, (x, alpha), g)):
        assert torch.equal(a, b)
    assert not wrapped[0].direct and not wrapped[1].direct


def test_create_graph_gives_first_order_grads_and_refuses_a_second_backward(interpreted_kernels):
    """The backward skips ``once_differentiable`` for speed, except under ``create_graph=True``, where it must
    still give the first-order gradients and refuse to be differentiated again."""
    x = (torch.randn(2, 3, 5, 5, dtype=torch.float64) * 4).requires_grad_()
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    bounds = torch.tensor([0.0, 6.0], dtype=torch.float64)
    y = TritonClampBlend.apply(x, alpha, bounds, interpreted_kernels)
    gx, ga = torch.autograd.grad(y.pow(2).sum(), (x, alpha), create_graph=True)
    rx, ra = torch.autograd.grad(_reference(x, alpha, 0.0, 6.0).pow(2).sum(), (x, alpha))
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, ra, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (gx.sum() + ga).backward()


def test_triton_blend_refuses_cpu_tensors_outside_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    act = lf.FoldableActivation(torch.nn.ReLU6(), "site", 0.3, blend="triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        act(torch.randn(2, 3, 4, 4))


def test_auto_falls_back_to_eager_when_the_kernels_fail(monkeypatch):
    """A machine where Triton cannot run (here: kernels refused for a CPU tensor) warns once and trains on."""
    from hf_layerfold import activation

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(activation, "_TRITON_FAILED", False)
    act = lf.FoldableActivation(torch.nn.ReLU6(), "site", 0.3).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64) * 4
    with pytest.warns(RuntimeWarning, match="Triton blend kernels failed"):
        y = act._auto_triton(x)
    assert activation._TRITON_FAILED
    torch.testing.assert_close(y, _reference(x, act.alpha.detach(), 0.0, 6.0), rtol=0, atol=1e-12)


def test_kernel_bounds_come_from_the_python_floats():
    """A half-precision model must not round Hardtanh bounds the kernels use."""
    act = lf.FoldableActivation(torch.nn.Hardtanh(-0.1, 0.3), "site", 0.3).half()
    bounds = act._bounds_like(torch.zeros(1, dtype=torch.float16))
    assert bounds.dtype == torch.float32 and bounds.tolist() == torch.tensor([-0.1, 0.3]).tolist()


@cuda
@pytest.mark.parametrize("lo,hi", BOUNDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_eager_blend(lo, hi, dtype):
    torch.manual_seed(0)
    x = (torch.randn(8, 32, 57, 57, device="cuda") * 4).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    alpha = torch.tensor(0.3, device="cuda", requires_grad=True)
    bounds = torch.tensor([lo, hi], device="cuda")
    y = TritonClampBlend.apply(x, alpha, bounds)
    ref = ClampBlend.apply(x, alpha, lo, hi)
    g = torch.randn_like(ref)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(y, ref, **tol)
    (gx, ga), (rx, ra) = _grads(y, (x, alpha), g), _grads(ref, (x, alpha), g)
    torch.testing.assert_close(gx, rx, **tol)
    torch.testing.assert_close(ga, ra.float(), rtol=1e-3 if dtype == torch.float32 else 2e-2, atol=1e-2)


@cuda
def test_cuda_prepared_model_auto_matches_eager(monkeypatch):
    """On CUDA "auto" is the Triton kernels: the CPU-only compiled regions are never asked."""
    from hf_layerfold import activation, fused

    def cpu_only(*args, **kwargs):
        raise AssertionError("the compiled CPU path ran on CUDA")

    monkeypatch.setattr(fused, "compiled_bn_blend", cpu_only)
    monkeypatch.setattr(activation, "compiled_clamp_blend", cpu_only)
    monkeypatch.setattr(activation, "_TRITON_FAILED", False)
    monkeypatch.setattr(activation, "_COMPILE_FAILED", False)  # set, had the compiled path been tried and failed
    torch.manual_seed(0)
    base = timm.create_model("mobilenetv2_050", num_classes=10).cuda()
    auto = lf.prepare_model(copy.deepcopy(base), lf.LayerFoldingConfig(alpha_init=0.3))
    eager = lf.prepare_model(copy.deepcopy(base), lf.LayerFoldingConfig(alpha_init=0.3, blend="eager"))
    x = torch.randn(4, 3, 96, 96, device="cuda")
    outs = []
    for model in (auto, eager):
        model.train()
        model(x).pow(2).mean().backward()
        outs.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in outs[1].items():
        torch.testing.assert_close(outs[0][name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert not activation._TRITON_FAILED and not activation._COMPILE_FAILED
