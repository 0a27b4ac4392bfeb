"""Timing on the device a model will run on: device names, and interleaved latency rounds (median ms per forward).

Used by the fold-gain and merge-cost measurements, the CLI's ``benchmark`` and the benchmarks; it imports nothing
else from the package, so the library's measurements do not depend on the CLI's modules.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
import platform
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DTYPES = ("fp32", "bf16", "fp16")


class DeviceError(ValueError):
    """A device name that is malformed, unsupported here, or names hardware this machine lacks (``missing``:
    a ``RuntimeError`` as well); ``reason`` says which, without the name."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(self.message(name, reason))
        self.reason = reason

    @staticmethod
    def message(name: str, reason: str) -> str:
        return f"invalid device {name!r}: {reason}"


class MissingDeviceError(DeviceError, RuntimeError):
    """The name is fine; this machine has no such device."""

    @staticmethod
    def message(name: str, reason: str) -> str:
        return f"device {name!r} requested but {reason}"


def resolve_device(name: str, *, timing: bool = False):
    """The ``torch.device`` named by ``name`` (``"auto"``: CUDA when available, else CPU), for library callers: a
    :class:`MissingDeviceError` (a ``RuntimeError``) when it names a device this machine lacks, a
    :class:`DeviceError` (a ``ValueError``) for a malformed or unsupported name. Timing (``timing=True``) takes CPU
    and CUDA only, whose clocks it synchronises; evaluation and training also take another accelerator torch has
    here (``mps``, ``xpu``)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(name, str(err)) from None
    others = () if timing else ("mps", "xpu")
    if device.type not in ("cpu", "cuda", *others):
        raise DeviceError(name, "supported devices are cpu, cuda, cuda:N and auto"
                          + ("" if timing else " (and mps or xpu where torch has them)"))
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise DeviceError(name, "there is one CPU device, cpu")
        return torch.device("cpu")  # (cpu:0 is cpu: what Trainer's use_cpu is decided from)
    backend = getattr(torch.backends, "mps", None) if device.type == "mps" else getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        raise MissingDeviceError(name, f"{device.type.upper()} is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(name, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_timing_args(who: str, *, batch_size: int = 1, rounds: int = 1, warmup: int = 0,
                      round_seconds: float = 1.0, dtype: str = "fp32") -> None:
    """Refuse timing arguments that cannot time anything, with ``who`` (the function called) in the message."""
    for name, value in (("batch_size", batch_size), ("rounds", rounds)):
        try:
            whole = not isinstance(value, bool) and operator.index(value) >= 1  # (numpy integers too)
        except TypeError:
            whole = False
        if not whole:
            raise ValueError(f"{who}: {name} must be a positive integer, got {value!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
        raise ValueError(f"{who}: warmup must be a whole number of passes >= 0, got {warmup!r}")
    if isinstance(round_seconds, bool) or not isinstance(round_seconds, numbers.Real) or not (
            math.isfinite(round_seconds) and round_seconds > 0):
        raise ValueError(f"{who}: round_seconds must be a finite number > 0, got {round_seconds!r}")
    if dtype not in DTYPES:
        raise ValueError(f"{who}: dtype {dtype!r} is not supported; supported: {', '.join(DTYPES)}")


def cpu_model_name() -> str:
    """The CPU's model name, for the record beside a timing (``/proc/cpuinfo`` where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_latency(models: Mapping[str, Any], input_size: Sequence[int], *, batch_size: int = 1,
                    device: str = "cpu", dtype: str = "fp32", channels_last: bool = False, warmup: int = 3,
                    rounds: int = 7, round_seconds: float = 0.25) -> dict[str, float]:
    """Median milliseconds per forward of each model (on copies; the given models are not moved).

    The models are timed in interleaved rounds (A, B, A, B, ...), so that load from other processes on a shared
    machine falls on every model alike; the median over rounds drops the rounds it hit hardest.
    """
    samples = latency_samples(models, input_size, batch_size=batch_size, device=device, dtype=dtype,
                              channels_last=channels_last, warmup=warmup, rounds=rounds, round_seconds=round_seconds)
    return {name: statistics.median(t) for name, t in samples.items()}


def latency_samples(models: Mapping[str, Any], input_size: Sequence[int], *, batch_size: int = 1,
                    device: str = "cpu", dtype: str = "fp32", channels_last: bool = False, warmup: int = 3,
                    rounds: int = 7, round_seconds: float = 0.25, shuffle: bool = False) -> dict[str, list[float]]:
    """Milliseconds per forward of each model in each round (``measure_latency``'s samples, for paired ratios).

    ``shuffle`` visits the models in a new order every round (the same seeded sequence on every call), so no model
    always follows the same one.
    """
    import torch

    check_timing_args("measure_latency", batch_size=batch_size, rounds=rounds, warmup=warmup,
                      round_seconds=round_seconds, dtype=dtype)
    dev = resolve_device(device, timing=True)  # a library call: ValueError / RuntimeError, not the CLI's message
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, *input_size, device=dev, dtype=torch_dtype).contiguous(memory_format=fmt)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    runs: dict[str, tuple[Any, int]] = {}
    order = random.Random(0)
    with torch.inference_mode():
        for name, model in models.items():
            m = copy.deepcopy(model).eval().to(device=dev, dtype=torch_dtype, memory_format=fmt)
            for _ in range(warmup):
                m(x)
            sync()
            start = time.perf_counter()
            m(x)
            sync()
            once = max(time.perf_counter() - start, 1e-6)
            runs[name] = (m, max(1, int(round_seconds / once)))
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds):
            for name in order.sample(list(runs), len(runs)) if shuffle else runs:
                m, iters = runs[name]
                sync()
                start = time.perf_counter()
                for _ in range(iters):
                    m(x)
                sync()
                times[name].append(1e3 * (time.perf_counter() - start) / iters)
    return times
