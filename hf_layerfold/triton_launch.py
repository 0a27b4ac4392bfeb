"""Launching the blend kernels with less host time per call than Triton's JIT.

A searching site launches two Triton kernels per training step, one each way. Triton's ``kernel[grid](...)`` binds
the arguments, derives their specialization and looks the compiled kernel up on every call. At batch 64 an H100's
search step is partly bound by host time: there one site's kernel route costs 305 µs of host time per step through
the JIT against 70 µs for timm's ReLU6 (``benchmarks/results/profile_step_cuda.json``). :class:`DirectLaunch` keeps
the kernel that Triton compiled for a combination of argument types and calls its launcher directly, only for calls
Triton would specialize the same way, and only after one direct launch was checked bit for bit against the JIT's
own: 276 µs for the route instead of 305, and a batch-64 step ratio for mobilenetv2_100 of 1.17× between two runs
without it at 1.20 and 1.21× on the same machine (``train_overhead_cuda_direct_ab.json``). An asynchronous CUDA
fault is something no output comparison catches, so it is on by default only for the Triton releases it has run on
(:data:`CHECKED_TRITON`: 3.6, whose CUDA tests passed on an H100); ``HF_LAYERFOLD_TRITON_DIRECT_LAUNCH=1`` turns it
on for others, ``=0`` off (read when the kernels are first launched in a process).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence

import torch

DIRECT_LAUNCH_ENV = "HF_LAYERFOLD_TRITON_DIRECT_LAUNCH"  # "1" on, "0" off; unset: on for CHECKED_TRITON
# (major, minor) of the Triton releases whose launcher convention was read in their source and run on a GPU
CHECKED_TRITON = frozenset({(3, 6)})
_INT32_MAX = 2**31 - 1


def _triton_version() -> tuple[int, int] | None:
    try:
        import triton

        return tuple(int(part) for part in triton.__version__.split(".")[:2])
    except Exception:  # noqa: BLE001 - not installed, broken, or no "major.minor" version: unchecked
        return None


def direct_launch_wanted() -> bool:
    """What ``HF_LAYERFOLD_TRITON_DIRECT_LAUNCH`` asks for, and when unset, whether this Triton is a checked one."""
    value = os.environ.get(DIRECT_LAUNCH_ENV, "").strip()
    if value in ("0", "1"):
        return value == "1"
    if value:
        warnings.warn(f"{DIRECT_LAUNCH_ENV}={value!r} is not understood (use 1 or 0); using the default",
                      RuntimeWarning, stacklevel=3)
    return _triton_version() in CHECKED_TRITON


def specialization_key(args: Sequence, device_type: str = "cuda") -> tuple | None:
    """What Triton specializes a launch on, where it is the common case, else ``None`` (take the JIT).

    Triton compiles one kernel per argument dtype, per pointer alignment (16 bytes or not) and per integer class
    (1, a multiple of 16, other; 32 or 64 bits). The direct route only takes the class every tensor of a network
    falls in: tensors on the device, every pointer 16-byte aligned, every integer a multiple of 16 in int32 range.
    """
    cuda, key, device = device_type == "cuda", [], None
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.is_cuda is not cuda or a.data_ptr() % 16 or (not cuda and a.device.type != device_type):
                return None
            key.append(a.dtype)
            device = a.get_device() if device is None else device
        elif isinstance(a, bool) or not isinstance(a, int) or a % 16 or not 16 <= a <= _INT32_MAX:
            return None
    return None if device is None else (device, *key)


@functools.cache
def _hook_holder():
    """Where this Triton keeps its launch hooks: ``triton.knobs.runtime``, or ``CompiledKernel`` before knobs."""
    try:
        from triton import knobs

        if hasattr(knobs.runtime, "launch_enter_hook"):
            return knobs.runtime
    except ImportError:
        pass
    from triton.compiler import CompiledKernel

    return CompiledKernel


def _idle(hook) -> bool:
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


def _launch_hooks_idle() -> bool:
    """No launch hook is registered (a profiler such as proton registers one and must see every launch)."""
    holder = _hook_holder()
    return _idle(getattr(holder, "launch_enter_hook", None)) and _idle(getattr(holder, "launch_exit_hook", None))


def _capturing() -> bool:
    """Inside a CUDA graph capture the check's comparison (a synchronization) is not allowed: it waits."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _raw_stream(device: int) -> int:
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return get(device) if get is not None else torch.cuda.current_stream(device).cuda_stream


class DirectLaunch:
    """``kernel[grid](*args, **constexprs)`` as Triton's JIT runs it, with the JIT skipped where the key says Triton
    would pick the same compiled kernel.

    The first call of each :func:`specialization_key` goes through the JIT, which compiles the kernel and returns
    it; the compiled kernel's launcher is then called once more, on scratch copies of the outputs (``outputs``: the
    positions of the arguments the kernel writes; no input may alias them), and adopted for that key if every
    output came out bit-identical. A launcher that raises or differs turns the direct route off for this kernel,
    with a warning; every call then goes through the JIT, as before. Callers launch with the tensors' device
    current (``triton_blend`` does), as the JIT, which compiles for the current device, needs anyway. Kernels
    whose constexprs are not the last parameters, and launches under Triton's debug or instrumentation modes, stay
    with the JIT. ``enabled``: ``None`` asks :func:`direct_launch_wanted`.
    """

    def __init__(self, kernel, outputs: tuple[int, ...], device_type: str = "cuda",
                 stream: Callable[[int], int] = _raw_stream, enabled: bool | None = None) -> None:
        self.kernel = kernel
        self.outputs = outputs
        self.device_type = device_type
        self.stream = stream
        self.direct: dict[tuple, Callable] = {}
        # ROCm's Triton also specializes on whether a tensor spans under 2 GB, which the key does not record
        wanted = direct_launch_wanted() if enabled is None else enabled
        self.enabled = wanted and torch.version.hip is None

    def __getitem__(self, grid: tuple[int, ...]) -> Callable:
        return functools.partial(self._launch, grid)

    def _launch(self, grid: tuple[int, ...], *args, **constexprs):
        key = specialization_key(args, self.device_type) if self.enabled else None
        if key is not None:
            key += tuple(constexprs.items())
            run = self.direct.get(key)
            if run is not None and _launch_hooks_idle():
                return run(grid, args)
        compiled = self.kernel[grid](*args, **constexprs)
        if key is not None and key not in self.direct and compiled is not None and not _capturing():
            self._adopt(key, compiled, grid, args, constexprs)
        return compiled

    def _adopt(self, key: tuple, compiled, grid: tuple[int, ...], args: tuple, constexprs: dict) -> None:
        names = list(getattr(self.kernel, "arg_names", None) or [])
        if names[len(args):] != list(constexprs) or len(names) != len(args) + len(constexprs) or _jit_debugging():
            return  # the launcher takes arguments in signature order: only positional ones, then the constexprs
        scratch = list(args)
        for i in self.outputs:
            scratch[i] = torch.empty_like(args[i])
        tails = (list(constexprs.values()), [])  # Triton >= 3.3 passes the constexprs too, older ones do not
        error = None
        for tail in tails:
            try:
                run = _direct_runner(compiled, tail, self.stream, key[0])
                run(grid, scratch)
            except Exception as err:  # noqa: BLE001 - the other argument convention, or no direct route here
                error = f"{type(err).__name__}: {err}"
                continue
            if all(torch.equal(_bits(scratch[i]), _bits(args[i])) for i in self.outputs):
                self.direct[key] = run
                return
            error = "its outputs differed from the JIT launch's"
            break
        self.enabled = False
        warnings.warn(f"hf_layerfold: launching {getattr(self.kernel, '__name__', self.kernel)} directly failed "
                      f"({error}); every launch goes through Triton's JIT from now on", RuntimeWarning, stacklevel=4)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers: NaN equals NaN, -0.0 differs from 0.0 (any layout; same element size)."""
    if not t.is_floating_point():
        return t
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _jit_debugging() -> bool:
    """Triton's debug or instrumentation mode, which its JIT keys kernels on: keep those launches in the JIT."""
    try:
        from triton import knobs

        return bool(knobs.runtime.debug) or getattr(knobs.compilation, "instrumentation_mode", "") not in ("", None)
    except (ImportError, AttributeError):
        return False


def _direct_runner(compiled, tail: list, stream: Callable[[int], int], device: int) -> Callable:
    """The compiled kernel's own launcher with the JIT's arguments, launch metadata and hooks left out (idle)."""
    launcher, function, metadata = compiled.run, compiled.function, compiled.packed_metadata

    def run(grid: tuple[int, ...], args: Sequence) -> None:
        launcher(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream(device),
                 function, metadata, None, None, None, *args, *tail)

    return run
