"""The learnable-linear activation that Layer Folding puts at every candidate site."""

from __future__ import annotations

import contextlib
import copy
import math
import re
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BLEND_BACKENDS
from .triton_blend import triton_available, triton_clamp_blend


def _not_inplace(act: nn.Module) -> nn.Module:
    """The input is needed after the activation runs (for ``α·x``), so an in-place activation must not own it. The
    copy keeps the activation's own Parameter objects (a PReLU's slope), as prepare_model promises."""
    act = copy.deepcopy(act, memo={id(p): p for p in act.parameters()})
    for m in act.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return act


def clamp_bounds(act: nn.Module) -> tuple[float, float] | None:
    """``(lo, hi)`` when ``act`` is a clamp (ReLU6, Hardtanh), else ``None``."""
    if isinstance(act, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(act, nn.Hardtanh):
        return float(act.min_val), float(act.max_val)
    return None


class ClampBlend(torch.autograd.Function):
    """``lerp(clamp(x, lo, hi), x, α)`` with a hand-written backward that saves only ``x``.

    Autograd through ``torch.lerp(act(x), x, α)`` keeps ``act(x)`` alive and runs the lerp backward, the clamp
    backward and a separate product + sum for α; this does the same math in fewer passes over the tensor.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        ctx.save_for_backward(x, alpha)
        ctx.bounds = (lo, hi)
        return x.clamp(lo, hi).lerp_(x, alpha.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, alpha = ctx.saved_tensors
        lo, hi = ctx.bounds
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[1]:  # ∂L/∂α = Σ g·(x − clamp(x)), one dot product
            excess = x - x.clamp(lo, hi)
            grad_alpha = torch.vdot(grad.reshape(-1), excess.reshape(-1)).to(alpha.dtype)
        if ctx.needs_input_grad[0]:  # g inside (lo, hi), α·g outside
            grad_x = torch.ops.aten.hardtanh_backward(grad, x, lo, hi).lerp_(grad, alpha.to(grad.dtype))
        return grad_x, grad_alpha, None, None


def clamp_blend(x: torch.Tensor, alpha: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """The blend for a clamp activation as ``blend="compile"`` hands it to the compiler.

    The clamp's gradient is hardtanh's (1 strictly inside ``(lo, hi)``, 0 on the bounds), as in the eager, Triton and
    plain ``act(x)`` blends: a compiled ``torch.clamp`` gives 0.5 on the bounds, and exact zeros are common (a channel
    constant over the batch leaves train-mode BatchNorm at its bias, 0 at init)."""
    return _TensorClampBlend.apply(x, alpha.to(x.dtype), bounds)


class _TensorClampBlend(torch.autograd.Function):
    """:class:`ClampBlend` with the bounds a tensor (one compiled graph for every range). The backward recomputes
    the "inside" mask from ``x``: written as ``torch.where(inside, x, clamp(x).detach())`` instead, the compiled CPU
    kernels (which then pass a boolean mask from forward to backward) ran about 15x slower, forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, alpha, bounds)
        return torch.lerp(torch.clamp(x, bounds[0], bounds[1]), x, alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, alpha, bounds = ctx.saved_tensors
        lo, hi = bounds[0], bounds[1]
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[1]:  # ∂L/∂α = Σ g·(x − clamp(x))
            grad_alpha = (grad * (x - torch.clamp(x, lo, hi))).sum_to_size(alpha.shape)
        if ctx.needs_input_grad[0]:  # g strictly inside (lo, hi) (hardtanh's gradient: 0 on the bounds), α·g outside
            grad_x = torch.where((x > lo) & (x < hi), grad, grad * alpha)
        return grad_x, grad_alpha, None


_compiled_clamp_blend = None
_TRITON_FAILED = False  # set when blend="auto" found the Triton kernels unusable on this machine
_COMPILE_FAILED = False  # set when blend="auto" found torch.compile unusable on this machine (CPU)


# Below this many elements a compiled region's per-call cost (guards, autograd wrapper) outweighs the passes it saves:
# one BatchNorm + ReLU6 site, forward and backward, 1 CPU thread, broke even at about 65k elements (8×64×8×8).
AUTO_COMPILE_MIN_NUMEL = 1 << 16


def auto_compiles(x: torch.Tensor) -> bool:
    """Whether ``blend="auto"`` takes the compiled path for ``x``: CPU tensors large enough to gain from it, while
    the compiler has not failed."""
    return x.device.type == "cpu" and x.numel() >= AUTO_COMPILE_MIN_NUMEL and not _COMPILE_FAILED


def fast_or_eager(fast, eager, failed_flag: str, failure: str):
    """``fast()``, one of ``blend="auto"``'s fast paths; if it cannot run on this machine, warn once (``failure``
    names the path) and return ``eager()``, setting the module flag ``failed_flag`` so that path is not tried again,
    rather than failing a training run. An error that the eager blend raises as well (a wrong input) is the
    caller's: it propagates and the fast path stays on."""
    if globals()[failed_flag]:
        return eager()
    handling = sys.exc_info()[1]  # an exception the caller is already handling (a Ctrl-C it caught) is not this stop
    try:
        return fast()
    except Exception as err:  # noqa: BLE001 - any failure of an optional fast path
        if _interrupted(err, handling):  # a Ctrl-C the compiler wrapped: the user's stop, not a failure of the path
            raise KeyboardInterrupt from err
        out = eager()
        globals()[failed_flag] = True
        warnings.warn(f"{failure} ({type(err).__name__}: {err}); blend='auto' uses the eager blend from now on",
                      RuntimeWarning, stacklevel=3)
        return out


def _interrupted(err: BaseException, handling: BaseException | None = None) -> bool:
    """Whether ``err`` wraps a KeyboardInterrupt (torch.compile re-raises one that lands mid-compile as another
    exception, chained) raised while the fast path ran: the chain stops at ``handling``, the exception the caller
    was already handling when the fast path started (every exception raised then has it as its context)."""
    seen: set[int] = set()
    while err is not None and err is not handling and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def compiled_or_eager(compiled, eager):
    """The compiled path of ``blend="auto"`` (CPU) with its eager fallback (no C++ compiler, an unsupported
    platform, torch's recompile limit reached after many shapes and dtypes in one process). Both graphs compile on
    the first call, before anything runs (the backward too: see ``_backward_compiles_now``), so a failure leaves no
    half-applied step."""
    def run_compiled():
        with _backward_compiles_now():
            return compiled()

    return fast_or_eager(run_compiled, eager, "_COMPILE_FAILED", "torch.compile failed for the blend")


@contextlib.contextmanager
def _backward_compiles_now():
    """With symbolic shapes, torch compiles the backward during the first forward but, if that fails, only logs it
    and fails later inside ``loss.backward()``, past any fallback. This makes that failure raise in the forward."""
    from torch._functorch import config

    if not hasattr(config, "force_non_lazy_backward_lowering"):
        yield
        return
    old = config.force_non_lazy_backward_lowering
    config.force_non_lazy_backward_lowering = True
    try:
        yield
    finally:
        config.force_non_lazy_backward_lowering = old


def compiled_clamp_blend(x: torch.Tensor, alpha: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """The clamp blend as one ``torch.compile`` kernel each way, shared by every site: shapes are symbolic and the
    bounds a tensor (``[lo, hi]``; Python-float bounds were seen to reuse one range's graph for another)."""
    global _compiled_clamp_blend
    if _compiled_clamp_blend is None:
        _compiled_clamp_blend = torch.compile(clamp_blend, dynamic=True, fullgraph=True)
    return _compiled_clamp_blend(x, alpha, bounds.to(x.dtype))


_PHASES = (None, "nonlinear", "linear")  # FoldableActivation.fixed, as its state-dict entry counts it
_PHASE_WORDS = {None: "searching (no plan applied)", "nonlinear": "kept non-linear by a plan",
                "linear": "made linear by a plan"}
_PLAN_ADVICE = {  # (where the weights come from, the model they are loaded into) -> what to do
    "planned": "apply the plan the weights record before loading them, apply_plan(model, "
               "FoldPlan.from_state_dict(state_dict)), so the sites are frozen and the padding moved as they expect",
    "searching": "these are a searching model's weights: load them into a prepared model without a plan, then "
                 "apply_plan",
    "replanned": "the weights come from another plan: load them into a freshly prepared model with "
                 "apply_plan(model, FoldPlan.from_state_dict(state_dict)) applied first",
}
_EXTRA_STATE = "._extra_state"


def _decode_phase(value: object) -> str | None:
    code = int(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else -1
    return _PHASES[code] if 0 <= code < len(_PHASES) else "unknown"


def recorded_phases(state_dict) -> dict[str, str | None]:
    """Site → the phase a prepared model's state dict records for it (``None`` searching, ``"nonlinear"``,
    ``"linear"``)."""
    phases = {key[: -len(_EXTRA_STATE)]: _decode_phase(value) for key, value in state_dict.items()
              if key.endswith(_EXTRA_STATE)}
    return {site: phase for site, phase in phases.items() if phase != "unknown"}


class FoldableActivation(nn.Module):
    """``(1 − α)·act(x) + α·x`` with one scalar α per site.

    α = 0 is the original activation, α = 1 the identity. After a plan is applied, α is frozen at exactly
    0 or 1 and the forward takes the matching shortcut, so a planned model costs nothing extra.

    ``blend`` picks how a searching site computes the blend: ``"eager"`` (ReLU as a one-slope PReLU, clamps such
    as ReLU6 through :class:`ClampBlend`, anything else through ``torch.lerp``), ``"compile"`` (clamps and ReLU
    as one ``torch.compile`` kernel each way; needs a working inductor backend), ``"triton"`` (clamps and ReLU
    through the hand-written kernels of :mod:`hf_layerfold.triton_blend`; CUDA tensors) or ``"auto"`` (the default:
    ``"triton"`` for CUDA tensors when Triton is installed, ``"compile"`` for CPU tensors of at least
    ``AUTO_COMPILE_MIN_NUMEL`` elements, and ``"eager"`` for the rest or wherever those cannot run). Other
    activations (SiLU, ...) always take ``torch.lerp``.
    """

    def __init__(self, act: nn.Module, site: str, alpha_init: float = 0.0, blend: str = "auto") -> None:
        super().__init__()
        if blend not in BLEND_BACKENDS:
            raise ValueError(f"blend={blend!r} is not supported; choose one of {BLEND_BACKENDS}")
        self.act = _not_inplace(act)
        self.site = site
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.fixed: str | None = None  # None while searching; "linear" or "nonlinear" once planned
        self.blend = blend
        self._is_relu = type(self.act) is nn.ReLU
        self._bounds = (0.0, math.inf) if self._is_relu else clamp_bounds(self.act)
        if blend in ("compile", "auto") and self._bounds is not None:  # not in the state dict; follows .to(device)
            self.register_buffer("_bounds_tensor", torch.tensor(self._bounds), persistent=False)
        self._kernel_bounds: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> [lo, hi] for the Triton kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed == "linear":
            return x
        if self.fixed == "nonlinear":
            return self.act(x)
        if torch.compiler.is_compiling():  # inside a compiled model: plain ops, which the compiler fuses itself
            return torch.lerp(self.act(x), x, self.alpha.to(x.dtype))
        if self._bounds is not None:
            if self.blend == "triton":
                return triton_clamp_blend(x, self.alpha, self._bounds_like(x))
            if self.blend == "auto" and x.is_cuda and triton_available() and not _TRITON_FAILED:
                return self._auto_triton(x)
            if self.blend == "compile":
                return compiled_clamp_blend(x, self.alpha, self._bounds_tensor)
            if self.blend == "auto" and auto_compiles(x):
                return compiled_or_eager(lambda: compiled_clamp_blend(x, self.alpha, self._bounds_tensor),
                                         lambda: self._eager(x))
        return self._eager(x)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        if self._is_relu:  # (1-α)·relu(x) + α·x is a PReLU with one shared slope: one fused kernel each way
            return F.prelu(x, self.alpha.to(x.dtype).reshape(1))
        if self._bounds is not None:
            return ClampBlend.apply(x, self.alpha, *self._bounds)
        return torch.lerp(self.act(x), x, self.alpha.to(x.dtype))

    def __getattr__(self, name: str):
        if name == "alpha":  # a site tied to another reads that site's α (see share_alpha)
            leader = self.__dict__.get("_alpha_leader")
            if leader is not None:
                return leader.alpha
        return super().__getattr__(name)

    def share_alpha(self, leader: FoldableActivation) -> None:
        """Use ``leader``'s α from now on (this site's own α leaves the module and its state dict). The leader is
        held outside ``_modules`` so it is neither a submodule here nor saved twice."""
        if leader is self or self.__dict__.get("_alpha_leader") is not None or "alpha" not in self._parameters:
            raise ValueError(f"site {self.site!r} cannot share the α of {leader.site!r}")
        del self._parameters["alpha"]
        self.__dict__["_alpha_leader"] = leader

    @property
    def alpha_owner(self) -> str:
        """The site whose α this site uses (itself unless it shares another's)."""
        leader = self.__dict__.get("_alpha_leader")
        return self.site if leader is None else leader.site

    def _bounds_like(self, x: torch.Tensor) -> torch.Tensor:
        """``[lo, hi]`` in the kernels' compute dtype, built from the Python floats (a ``model.half()`` must not
        round them) once per device and dtype."""
        want = torch.float64 if x.dtype == torch.float64 else torch.float32
        key = (x.device, want)
        if key not in self._kernel_bounds:
            self._kernel_bounds[key] = torch.tensor(self._bounds, dtype=want, device=x.device)
        return self._kernel_bounds[key]

    def _auto_triton(self, x: torch.Tensor) -> torch.Tensor:
        """The Triton kernels, or the eager blend where they cannot run (no C compiler for Triton's launcher, a
        broken install)."""
        return fast_or_eager(lambda: triton_clamp_blend(x, self.alpha, self._bounds_like(x)), lambda: self._eager(x),
                             "_TRITON_FAILED", "the Triton blend kernels failed")

    def fix(self, linear: bool) -> None:
        """Freeze α at exactly 1 (linear) or 0 (the original activation)."""
        with torch.no_grad():
            self.alpha.fill_(1.0 if linear else 0.0)
        self.alpha.requires_grad_(False)
        self.fixed = "linear" if linear else "nonlinear"

    def get_extra_state(self) -> torch.Tensor:
        """The site's phase in the state dict (0 searching, 1 kept non-linear, 2 linear): planned weights loaded
        into a searching model (or the reverse) would compute another function, the moved padding missing."""
        return torch.tensor(_PHASES.index(self.fixed), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Checked in ``_load_from_state_dict``, where a mismatch can join the other loading errors."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key, seen = prefix + _EXTRA_STATE[1:], len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in missing_keys[seen:]:  # a state dict written before sites recorded their phase: nothing to check
            missing_keys.remove(key)
        if key not in state_dict:
            return
        recorded = _decode_phase(state_dict[key])
        if recorded == self.fixed:
            if self.fixed is not None:  # a planned α is implied by its phase: weights planned with α shared by
                alpha = prefix + "alpha"  # block and per site (prepare_with_plan) load into each other
                if alpha in missing_keys:
                    missing_keys.remove(alpha)
                if alpha in unexpected_keys:
                    unexpected_keys.remove(alpha)
            return
        earlier = next((i for i, msg in enumerate(error_msgs) if msg.endswith(tuple(_PLAN_ADVICE.values()))), None)
        if earlier is None:  # one message for the whole model: the first site, and how many more disagree
            advice = _PLAN_ADVICE["searching" if recorded is None else "planned" if self.fixed is None else
                                  "replanned"]
            error_msgs.append(f"site {self.site!r} is {_PHASE_WORDS.get(self.fixed)} here but "
                              f"{_PHASE_WORDS.get(recorded, 'of an unknown phase')} in the state dict (1 site "
                              f"disagrees): {advice}")
        else:
            error_msgs[earlier] = re.sub(r"\((\d+) sites? disagrees?\)",
                                         lambda m: f"({int(m[1]) + 1} sites disagree)", error_msgs[earlier], count=1)

    @property
    def is_linear(self) -> bool:
        return self.fixed == "linear"

    def extra_repr(self) -> str:
        fixed = f", fixed={self.fixed}" if self.fixed else ""
        blend = f", blend={self.blend}" if self.blend != "auto" else ""
        shared = f", alpha_of={self.alpha_owner!r}" if self.alpha_owner != self.site else ""
        return f"site={self.site!r}, alpha={float(self.alpha.detach()):.4f}{shared}{fixed}{blend}"
