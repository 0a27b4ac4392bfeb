"""``LayerFoldingConfig``: every knob of Layer Folding in one JSON-serializable dataclass (peft style)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .files import write_text_atomic

LAYERFOLD_CONFIG_NAME = "layerfold_config.json"
REGULARIZERS = ("paper", "l1")
BLEND_BACKENDS = ("auto", "eager", "compile", "triton")
ALPHA_SHARING = ("site", "block")


def _mapping_from_text(text: str, name: str = "regularizer_weights") -> object:
    """A mapping field given as text: a JSON object, or the path of a JSON file holding one (or holding a whole
    config, as ``hf-layerfold gains --output`` writes: its ``name`` field is taken)."""
    stripped = text.strip()
    data = json.loads(stripped if stripped.startswith("{") else Path(text).expanduser().read_text())
    if isinstance(data, dict) and name in data:
        if data[name] is None and len(data) > 1:  # a whole config without the table asked for: not "none", silently
            source = ("`hf-layerfold gains --output` without --measure-merge-costs" if name == "merge_costs" else
                      "a run's layerfold_config.json that used no weights; `hf-layerfold gains --output` writes them")
            raise ValueError(f"it holds a config whose {name} is null (e.g. {source})")
        return data[name]
    if isinstance(data, dict) and {"groups", "baseline_ms"} <= set(data):
        if name == "merge_costs":
            raise ValueError("it holds a fold-gains measurement (what each block's fold saves), not merge costs: "
                             "measure those with measure_merge_costs or `hf-layerfold gains --measure-merge-costs`")
        raise ValueError("it holds a fold-gains measurement, not weights: use FoldGains.from_dict(data).weights(), "
                         "or the file `hf-layerfold gains --output` writes")
    return data


_NUMBER_FIELDS = {"alpha_init": False, "lambda_reg": False, "threshold": False, "max_kernel_size": True,
                  "max_macs_increase": False, "alpha_lr": False, "search_epochs": False, "search_steps": True,
                  "distill_weight": False, "distill_temperature": False}  # name -> whole numbers only
_OPTIONAL_FIELDS = ("max_macs_increase", "alpha_lr", "search_epochs", "search_steps")


@dataclass
class LayerFoldingConfig:
    """What to fold and how hard to push.

    Args:
        alpha_init: starting α of every site (0 = the pre-trained activation).
        lambda_reg: weight λ of the α regularizer in the loss.
        regularizer: ``"paper"`` = Σ|1−α²| (Ben Dror et al.), ``"l1"`` = Σ(1−α).
        threshold: a site whose α reaches this becomes the identity when the plan is fixed.
        alpha_sharing: ``"site"`` learns one α per activation (the paper); ``"block"`` shares one α among the sites
            of a block (an inverted residual's two activations), so a block turns linear as a whole and collapses
            into one conv: fewer, larger depth savings for the same number of linear sites. The regularizer still
            sums over sites, so a block's α is pushed in proportion to the activations it removes.
        target_modules: site-name patterns (fnmatch, or a regex prefixed ``re:``, matched against the whole site
            name, e.g. ``"blocks.*.bn1.act"``; a plain name also takes every site under that module, e.g.
            ``"blocks.1"``) to make foldable; ``None`` = every foldable site. Unlike peft, a plain name is not
            matched as a suffix (``"bn1.act"`` is the stem's site only), and a single string is one such pattern,
            not a regex.
        exclude_modules: site-name patterns never made foldable.
        max_kernel_size: largest merged kernel allowed; longer runs are split.
        max_macs_increase: ``None`` merges every run as far as ``max_kernel_size`` allows. A number ``x`` splits
            each run into the fewest convs such that no merged conv costs more than ``(1 + x)`` times the convs it
            replaces (``0``: folding never adds compute; merging a 1×1 into a depthwise conv alone would).
        merge_costs: measured latency (ms) of each conv and of each merge a run of convs can make, keyed by conv
            name (``"first>last"`` for a merge), from ``measure_merge_costs`` on the target device; with it each run
            splits into the pieces of least summed latency (within ``max_kernel_size`` and, if set,
            ``max_macs_increase``) instead of merging as far as it can: whether a merged dense conv beats the
            chain it replaces depends on the device. ``None`` = no measurement. Text is read as a JSON object or
            a JSON file.
        fold_residual: absorb a residual whose whole branch became linear as an identity tap.
        regularizer_weights: each site's weight in the regularizer, by site name, block name or pattern (a key that
            is the site's exact name wins, else the first matching key; unmatched sites weigh 1; a key that matches
            no prepared site, one left out by ``target_modules`` / ``exclude_modules`` included, is refused when
            the trainer is built). ``FoldGains.weights()`` (CLI: ``hf-layerfold gains``) sets them in
            proportion to the latency each fold saves on the target device, so the search removes first the
            activations that buy speed there; ``None`` = every site weighs 1 (the paper). Text (from a command line)
            is read as a JSON object or a JSON file.
        alpha_lr: learning rate of the α parameters (``None`` = the optimizer's).
        search_epochs: length of the α-search phase in epochs (``None`` and no ``search_steps``: half of
            training); the rest of training fine-tunes with the plan fixed.
        search_steps: length of the α-search phase in optimizer steps (wins over ``search_epochs``).
        distill_weight: weight ``w`` of knowledge distillation from a teacher: loss = (1 − w)·CE + w·KD (needs a
            teacher; 0 = none).
        distill_temperature: softmax temperature ``T`` of the distillation term (KL·T²).
        blend: how searching sites compute ``(1−α)·act(x) + α·x``: ``"auto"`` (``"triton"`` on CUDA when Triton is
            installed, ``"compile"`` for large CPU tensors, ``"eager"`` for small ones and where those cannot
            run; a few seconds of compiling on the first CPU step), ``"eager"`` (fused autograd functions, works
            everywhere), ``"triton"`` (hand-written CUDA kernels that move the bytes an in-place ReLU6 moves) or
            ``"compile"`` (``torch.compile``: BatchNorm and the blend after it as one compiled region where timm
            pairs them, else the blend alone; needs inductor: a C++ compiler on CPU, Triton on GPU). Only ReLU,
            ReLU6 and Hardtanh sites take the fast paths; other activations (SiLU, ...) always blend eagerly.
    """

    alpha_init: float = 0.0
    lambda_reg: float = 0.25
    regularizer: str = "paper"
    threshold: float = 0.9
    alpha_sharing: str = "site"
    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)
    max_kernel_size: int = 7
    max_macs_increase: float | None = None
    merge_costs: dict[str, float] | str | None = None  # str: JSON text or file, read by validate()
    fold_residual: bool = True
    regularizer_weights: dict[str, float] | str | None = None  # str: JSON text or file, read by validate()
    alpha_lr: float | None = None
    search_epochs: float | None = None
    search_steps: int | None = None
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    blend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"LayerFoldingConfig.{name}={getattr(self, name)!r} is invalid: {why}")

        for name, integer in _NUMBER_FIELDS.items():  # a wrong type (a YAML string, a list) named, not a TypeError
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise bad(name, "must be a finite number" + (" (or None)" if name in _OPTIONAL_FIELDS else ""))
            if integer and int(value) != value:
                raise bad(name, "must be a whole number")
            if type(value) not in (int, float) or (integer and type(value) is float):  # a NumPy scalar (a sweep over
                # np.arange) a plain number in JSON; a whole-number field given 5.0 (YAML, a division) an int
                setattr(self, name, int(value) if integer or isinstance(value, numbers.Integral) else float(value))
        if not isinstance(self.fold_residual, bool):
            raise bad("fold_residual", "must be true or false")
        if not 0.0 <= self.alpha_init <= 1.0:
            raise bad("alpha_init", "must lie in [0, 1]")
        if self.lambda_reg < 0:
            raise bad("lambda_reg", "must be >= 0")
        if self.regularizer not in REGULARIZERS:
            raise bad("regularizer", f"supported: {', '.join(REGULARIZERS)}")
        if not 0.0 < self.threshold <= 1.0:
            raise bad("threshold", "must lie in (0, 1]")
        if self.alpha_sharing not in ALPHA_SHARING:
            raise bad("alpha_sharing", f"supported: {', '.join(ALPHA_SHARING)}")
        if self.max_kernel_size < 1:
            raise bad("max_kernel_size", "must be a positive integer")
        if self.max_macs_increase is not None and self.max_macs_increase < 0:
            raise bad("max_macs_increase", "must be >= 0 (or None to merge every run)")
        if self.alpha_lr is not None and self.alpha_lr <= 0:
            raise bad("alpha_lr", "must be > 0 (or None for the optimizer's learning rate)")
        if self.search_epochs is not None and self.search_epochs < 0:
            raise bad("search_epochs", "must be >= 0")
        if self.search_steps is not None and self.search_steps < 0:
            raise bad("search_steps", "must be >= 0")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise bad("distill_weight", "must lie in [0, 1]")
        if self.distill_temperature <= 0:
            raise bad("distill_temperature", "must be > 0")
        if self.blend not in BLEND_BACKENDS:
            raise bad("blend", f"supported: {', '.join(BLEND_BACKENDS)}")
        for name, what in (("regularizer_weights", "site names or patterns"), ("merge_costs", "conv names")):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):  # a pathlib.Path of a JSON file, as a str path is read
                value = os.fspath(value)
            if isinstance(value, str):  # from a command line: JSON text or a JSON file
                try:
                    value = _mapping_from_text(value, name)
                except (OSError, ValueError) as err:
                    raise bad(name, f"not a JSON object nor a JSON file holding one ({err})") from None
                setattr(self, name, value)
            if value is None:
                continue
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise bad(name, f"must map {what} to numbers")
            for key, number in value.items():
                if isinstance(number, bool) or not isinstance(number, numbers.Real) or not 0 <= number < math.inf:
                    raise bad(name, f"the value of {key!r} must be a finite number >= 0")
            if any(type(number) not in (int, float) for number in value.values()):  # NumPy scalars: plain floats
                setattr(self, name, {key: float(number) for key, number in value.items()})
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif value is not None and (not isinstance(value, list | tuple) or
                                        not all(isinstance(v, str) for v in value)):
                raise bad(name, "must be a list of site-name patterns")
            elif isinstance(value, tuple):
                setattr(self, name, list(value))
            for pattern in getattr(self, name) or []:
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as err:
                        raise bad(name, f"the pattern {pattern!r} is not a valid regular expression ({err})") \
                            from None
        if self.exclude_modules is None:  # (None and [] mean the same: no exclusion)
            self.exclude_modules = []

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LayerFoldingConfig:
        if not isinstance(data, Mapping):
            raise ValueError(f"a LayerFoldingConfig is a mapping of its fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LayerFoldingConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``layerfold_config.json`` into ``save_directory`` (atomically)."""
        return write_text_atomic(Path(save_directory) / LAYERFOLD_CONFIG_NAME, self.to_json_string())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LayerFoldingConfig:
        """Read a directory holding ``layerfold_config.json`` (or the JSON file itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / LAYERFOLD_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {LAYERFOLD_CONFIG_NAME} at {path}")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:  # (JSONDecodeError, and UnicodeDecodeError for a binary file)
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except ValueError as err:  # which file holds the bad field (a run's, a save's, a copied one)
            raise ValueError(f"{path}: {err}") from None


def as_config(config: LayerFoldingConfig | Mapping | None) -> LayerFoldingConfig:
    """The config to use: a ``LayerFoldingConfig``, a mapping of its fields (checked), or ``None`` (the defaults)."""
    if config is None:
        return LayerFoldingConfig()
    if isinstance(config, Mapping):
        return LayerFoldingConfig.from_dict(dict(config))
    if not isinstance(config, LayerFoldingConfig):
        raise TypeError(f"expected a LayerFoldingConfig (or a dict of its fields), got {type(config).__name__}")
    return config
