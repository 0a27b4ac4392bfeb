"""DirectLaunch: when a site's kernels skip Triton's JIT, and that a launch is only adopted once checked.

Off CUDA the logic runs against a stand-in kernel with Triton's interface (``kernel[grid](...)`` returns the compiled
kernel, whose ``run`` takes the grid, a stream, the function, its metadata, launch metadata, two hooks, then the
arguments); the real kernels are checked on CUDA at the end.
"""

from __future__ import annotations

import pytest
import torch

from hf_layerfold import triton_launch
from hf_layerfold.triton_launch import DirectLaunch, specialization_key

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _Compiled:
    """A compiled "y = 2x" kernel; ``constexprs_passed``: the launcher convention (Triton >= 3.3 passes them)."""

    function, packed_metadata = "function", "metadata"

    def __init__(self, owner, constexprs_passed: bool, wrong: bool) -> None:
        self.owner, self.constexprs_passed, self.wrong = owner, constexprs_passed, wrong

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, exit_, *args):
        if len(args) != (4 if self.constexprs_passed else 3):
            raise TypeError(f"launcher takes {4 if self.constexprs_passed else 3} kernel arguments")
        assert (g1, g2, stream, function, metadata, launch_metadata, enter, exit_) == (
            1, 1, 7, "function", "metadata", None, None, None)
        self.owner.direct_calls += 1
        args[1].copy_(args[0] * 2 + (1 if self.wrong else 0))


class _Kernel:
    arg_names = ["x_ptr", "y_ptr", "n", "BLOCK"]

    def __init__(self, constexprs_passed: bool = True, wrong: bool = False) -> None:
        self.jit_calls = self.direct_calls = 0
        self.compiled = _Compiled(self, constexprs_passed, wrong)

    def __getitem__(self, grid):
        def launch(x, y, n, BLOCK):  # noqa: N803 - Triton's constexpr naming
            assert n == x.numel() and BLOCK == 16
            self.jit_calls += 1
            y.copy_(x * 2)
            return self.compiled
        return launch


def _launcher(kernel, **kwargs) -> DirectLaunch:
    return DirectLaunch(kernel, outputs=(1,), device_type="cpu", stream=lambda device: 7, **kwargs)


def _call(launch: DirectLaunch, x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    launch[(1,)](x, y, x.numel(), BLOCK=16)
    return y


@pytest.mark.parametrize("constexprs_passed", [True, False])
def test_after_one_checked_launch_the_jit_is_skipped(monkeypatch, constexprs_passed):
    monkeypatch.setenv(triton_launch.DIRECT_LAUNCH_ENV, "1")
    kernel = _Kernel(constexprs_passed)
    launch = _launcher(kernel)
    x = torch.randn(4, 8)
    torch.testing.assert_close(_call(launch, x), x * 2)
    assert (kernel.jit_calls, kernel.direct_calls, len(launch.direct)) == (1, 1, 1)  # the check's launch
    for _ in range(3):
        torch.testing.assert_close(_call(launch, x), x * 2, rtol=0, atol=0)
    assert (kernel.jit_calls, kernel.direct_calls) == (1, 4)


def test_a_launcher_that_differs_is_never_used(monkeypatch):
    monkeypatch.setenv(triton_launch.DIRECT_LAUNCH_ENV, "1")
    kernel = _Kernel(wrong=True)
    launch = _launcher(kernel)
    x = torch.randn(32)
    with pytest.warns(RuntimeWarning, match="outputs differed from the JIT launch's"):
        y = _call(launch, x)
    torch.testing.assert_close(y, x * 2, rtol=0, atol=0)  # the JIT's output, not the scratch copy
    assert not launch.enabled and not launch.direct
    _call(launch, x)
    assert (kernel.jit_calls, kernel.direct_calls) == (2, 1)


def test_the_check_compares_bits(monkeypatch):
    """NaN outputs (a diverged batch) are the same bits both ways: the launcher is adopted, not left undecided."""
    monkeypatch.setenv(triton_launch.DIRECT_LAUNCH_ENV, "1")
    kernel = _Kernel()
    launch = _launcher(kernel)
    _call(launch, torch.full((16,), float("nan")).contiguous(memory_format=torch.contiguous_format))
    assert launch.enabled and len(launch.direct) == 1
    assert not torch.equal(triton_launch._bits(torch.tensor([0.0])), triton_launch._bits(torch.tensor([-0.0])))


def test_kernels_whose_constexprs_are_not_last_stay_with_the_jit(monkeypatch):
    monkeypatch.setenv(triton_launch.DIRECT_LAUNCH_ENV, "1")
    kernel = _Kernel()
    kernel.arg_names = ["x_ptr", "BLOCK", "y_ptr", "n"]
    launch = _launcher(kernel)
    for _ in range(2):
        _call(launch, torch.randn(16))
    assert (kernel.jit_calls, kernel.direct_calls, launch.enabled) == (2, 0, True)


def test_calls_triton_would_specialize_otherwise_take_the_jit(monkeypatch):
    """A size not a multiple of 16, a pointer off 16-byte alignment: Triton compiles other kernels for those."""
    monkeypatch.setenv(triton_launch.DIRECT_LAUNCH_ENV, "1")
    kernel = _Kernel()
    launch = _launcher(kernel)
    ragged = torch.randn(3, 5)
    misaligned = torch.randn(33)[1:]
    for x in (ragged, misaligned, ragged):
        torch.testing.assert_close(_call(launch, x), x * 2)
    assert (kernel.jit_calls, kernel.direct_calls, launch.direct) == (3, 0, {})


def test_launch_hooks_or_the_switch_send_every_launch_through_the_jit(monkeypatch):
    monkeypatch.setenv(triton_launch.DIRECT_LAUNCH_ENV, "1")
    kernel = _Kernel()
    launch = _launcher(kernel)
    x = torch.randn(16)
    _call(launch, x)
    monkeypatch.setattr(triton_launch, "_launch_hooks_idle", lambda: False)  # a profiler's hook registered
    _call(launch, x)
    assert (kernel.jit_calls, kernel.direct_calls) == (2, 1)
    monkeypatch.setenv(triton_launch.DIRECT_LAUNCH_ENV, "0")
    off = _launcher(_Kernel())
    _call(off, x)
    _call(off, x)
    assert (off.kernel.jit_calls, off.kernel.direct_calls, off.direct) == (2, 0, {})
    assert _launcher(_Kernel(), enabled=True).enabled  # the argument wins over the environment


@pytest.mark.parametrize("version,env,on", [((3, 6), None, True), ((3, 8), None, False), (None, None, False),
                                            ((3, 6), "0", False), ((3, 8), "1", True), ((3, 6), "yes", True)])
def test_on_by_default_only_for_the_triton_it_ran_on(monkeypatch, version, env, on):
    monkeypatch.setattr(triton_launch, "_triton_version", lambda: version)
    if env is None:
        monkeypatch.delenv(triton_launch.DIRECT_LAUNCH_ENV, raising=False)
    else:
        monkeypatch.setenv(triton_launch.DIRECT_LAUNCH_ENV, env)
    if env == "yes":
        with pytest.warns(RuntimeWarning, match="not understood"):
            assert _launcher(_Kernel()).enabled is on
    else:
        assert _launcher(_Kernel()).enabled is on


def test_specialization_key():
    x = torch.zeros(16)
    assert specialization_key((x, x, 16), "cpu") == (-1, torch.float32, torch.float32)
    assert specialization_key((x, x.double(), 32), "cpu") == (-1, torch.float32, torch.float64)
    for args in [(x, 1), (x, 24), (x, 2**31), (x, True), (x, 16.0), (16,), (x, x[1:])]:
        assert specialization_key(args, "cpu") is None, args
    assert specialization_key((x, 16), "cuda") is None  # not on that device


@cuda
def test_cuda_direct_launch_matches_the_jit(monkeypatch):
    """The real kernels: the direct route is adopted and gives the JIT's outputs bit for bit, both ways."""
    from hf_layerfold.triton_blend import TritonClampBlend, build_kernels, direct_launchers

    monkeypatch.setenv(triton_launch.DIRECT_LAUNCH_ENV, "1")
    forward, backward = build_kernels()
    direct = direct_launchers((forward, backward))
    torch.manual_seed(0)
    x = (torch.randn(8, 32, 28, 28, device="cuda") * 4).requires_grad_()
    alpha = torch.tensor(0.3, device="cuda", requires_grad=True)
    bounds = torch.tensor([0.0, 6.0], device="cuda")
    g = torch.randn_like(x)
    results = []
    for kernels in ((forward, backward), direct, direct):  # JIT, then the check, then the adopted route
        y = TritonClampBlend.apply(x, alpha, bounds, kernels)
        results.append((y, *torch.autograd.grad(y, (x, alpha), g)))
    assert all(d.enabled and len(d.direct) == 1 for d in direct)
    calls = []
    monkeypatch.setattr(forward, "run", lambda *a, **k: calls.append("jit"))  # a third launch may not reach the JIT
    TritonClampBlend.apply(x, alpha, bounds, direct)
    assert calls == []
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            assert torch.equal(a, b)
