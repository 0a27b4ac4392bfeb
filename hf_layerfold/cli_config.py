"""``LayerFoldingConfig`` ↔ command-line flags, generated from the dataclass so a new field gets a flag for free.

Also reads the YAML/JSON ``--config`` file; user mistakes raise ``CLIError`` (one error line, exit code 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .config import ALPHA_SHARING, BLEND_BACKENDS, REGULARIZERS, LayerFoldingConfig
from .workflow import CLIError

FIELD_CHOICES = {"regularizer": REGULARIZERS, "alpha_sharing": ALPHA_SHARING, "blend": BLEND_BACKENDS}


def _config_field_help() -> dict[str, str]:
    """Per-field help text, read from the ``Args:`` section of ``LayerFoldingConfig``'s docstring."""
    doc = inspect.getdoc(LayerFoldingConfig) or ""
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in doc.split("Args:", 1)[-1].splitlines():
        match = re.match(r"^ {4}(\w+(?: / \w+)*): (.*)$", line)
        if match:
            names = match.group(1).split(" / ")
            for name in names:
                entries[name] = match.group(2).strip()
        elif line.startswith(" " * 8) and names:
            for name in names:
                entries[name] += " " + line.strip()
    return {k: v.replace("``", "").replace("%", "%%") for k, v in entries.items()}


def _optional(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in "invalid float value" messages
    return convert


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, title: str = "Layer Folding config (LayerFoldingConfig "
                     "fields; they override --config, which overrides the defaults)",
                     only: tuple[str, ...] | None = None) -> None:
    """One flag per ``LayerFoldingConfig`` field (or per field in ``only``); only flags given on the command line
    reach the config."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(LayerFoldingConfig)
    helps = _config_field_help()
    for field in dataclasses.fields(LayerFoldingConfig):
        if only is not None and field.name not in only:
            continue
        hint = hints[field.name]
        optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        text = f"{helps.get(field.name, '').rstrip('.')} (default: {default})"
        kwargs: dict[str, Any] = dict(dest=f"cfg_{field.name}", default=argparse.SUPPRESS, help=text)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kwargs.update(nargs="+", metavar="PATTERN")
        elif base in (int, float, str):
            kwargs["type"] = _optional(base) if optional else base
            # a field with a fixed set of values shows them; the config itself still checks (one error style)
            choices = FIELD_CHOICES.get(field.name)
            kwargs["metavar"] = ("{" + ",".join(choices) + "}" if choices
                                 else base.__name__.upper() + ("|none" if optional else ""))
        elif typing.get_origin(base) is dict:  # the config reads JSON text or a JSON file itself
            kwargs["metavar"] = "JSON|FILE"
        else:  # a field type this generator does not know: take JSON
            kwargs.update(type=json.loads, metavar="JSON")
        group.add_argument(_flag(field.name), **kwargs)


def describe_config_actions(parser: argparse.ArgumentParser) -> None:
    """Give the ``LayerFoldingConfig`` flags of an ``HfArgumentParser`` (built from the dataclass, whose fields carry
    no metadata) what :func:`add_config_flags` gives the CLI's: help from the docstring (so ``--help`` shows the
    defaults too), the fixed choices, and ``none`` for an optional number. Call before parsing."""
    hints = typing.get_type_hints(LayerFoldingConfig)
    helps = _config_field_help()
    for action in parser._actions:
        name = action.dest
        if name not in helps or action.help:
            continue
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's --no_<field> of a True default
            action.help = f"set {name} to False (see --{name})"
            continue
        action.help = helps[name].rstrip(".")
        if name in FIELD_CHOICES:
            action.choices = FIELD_CHOICES[name]
        if type(None) in typing.get_args(hints[name]) and action.type in (int, float):
            action.type = _optional(action.type)


def read_mapping_file(path: str) -> dict:
    """A YAML or JSON object from ``path``: a ``.json`` file is read as strict JSON (YAML would let a trailing comma
    or a comment through), anything else as YAML (a superset of JSON)."""
    import yaml

    try:
        text = Path(path).expanduser().read_text()
    except OSError as err:
        raise CLIError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as err:
        kind = "JSON" if path.lower().endswith(".json") else "YAML/JSON"
        raise CLIError(f"config file {path} is not valid {kind}: {err}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"config file {path} must hold a mapping of option names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): _yaml_number(v) for k, v in data.items()}


_EXPONENT_ONLY = re.compile(r"^[+-]?(\d+|\d*\.\d+)[eE][+-]?\d+$")


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (an exponent without a dot) as a string; read it as the number meant."""
    return float(value) if isinstance(value, str) and _EXPONENT_ONLY.match(value) else value


def build_config(file_values: Mapping[str, Any], args: argparse.Namespace) -> LayerFoldingConfig:
    """File values, overridden by the flags given, validated by ``LayerFoldingConfig`` itself."""
    values = dict(file_values)
    for field in dataclasses.fields(LayerFoldingConfig):
        if hasattr(args, f"cfg_{field.name}"):
            values[field.name] = getattr(args, f"cfg_{field.name}")
    try:
        return LayerFoldingConfig.from_dict(values)
    except (TypeError, ValueError) as err:  # TypeError: e.g. a string where YAML should have given a number
        raise CLIError(str(err) if str(err).startswith("LayerFoldingConfig") else
                       f"invalid LayerFoldingConfig: {err}") from None
