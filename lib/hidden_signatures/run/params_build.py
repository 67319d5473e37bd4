"""Typed building of the params dataclasses from YAML mappings: unknown keys, wrong types and bad layers are
rejected by name."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

from ..checks import ParamsError

RENAMED = {"train.autocast": "train.autocast: replaced by train.dtype (accepted: auto, bfloat16, float32)"}
"""Keys of earlier versions, with what to write instead."""


@dataclass
class LayerPair:
    """One comparison point: a label and the layer spec resolved in each model."""

    label: str
    a: str | int
    b: str | int


def parse_layers(raw: Any) -> list[LayerPair]:
    """`[first, middle, 7]` (same spec in both models) or `{label: [layer_a, layer_b]}`."""
    if isinstance(raw, list):
        return [_layer_entry(item) for item in raw]
    if isinstance(raw, dict):
        pairs = []
        for label, value in raw.items():
            if not (isinstance(value, list) and len(value) == 2):
                raise ParamsError(f"layers.{label}: {value!r} must be [layer_a, layer_b]")
            pairs.append(LayerPair(str(label), _layer_value(value[0]), _layer_value(value[1])))
        return pairs
    raise ParamsError(f"layers: {raw!r} must be a list like [first, middle, last] "
                      "or a mapping label: [layer_a, layer_b]")


def _layer_entry(item: Any) -> LayerPair:
    """One list entry: a layer spec used in both models, or {label, a, b} as saved by to_dict."""
    if isinstance(item, dict) and set(item) == {"label", "a", "b"}:
        return LayerPair(str(item["label"]), _layer_value(item["a"]), _layer_value(item["b"]))
    return LayerPair(str(item), _layer_value(item), _layer_value(item))


def _layer_value(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ParamsError(f"layers: {value!r} is not first, middle, last or an integer")
    if isinstance(value, str) and value not in ("first", "middle", "last"):
        raise ParamsError(f"layers: {value!r} is not first, middle, last or an integer")
    return value


def build(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where or 'params'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields and path in RENAMED:
            raise ParamsError(RENAMED[path])
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; accepted: {', '.join(fields)}"
            raise ParamsError(f"{path}: unknown key{hint}")
        kwargs[key] = _convert(hints[key], value, path)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ParamsError(f"{where or 'params'}: missing required field {missing[0]!r}")
    try:
        return cls(**kwargs)
    except ParamsError:
        raise
    except ValueError as exc:  # validation inside a nested dataclass (e.g. CorpusConfig)
        raise ParamsError(str(exc)) from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    """Check `value` against a type hint; build nested dataclasses; ints accepted for floats."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ParamsError:
                continue
        raise ParamsError(f"{path}: {value!r} has the wrong type; expected {_type_name(hint)}")
    if origin is list:
        if path.split(".")[-1] == "layers":
            return parse_layers(value)
        if not isinstance(value, list):
            raise ParamsError(f"{path}: {value!r} must be a list")
        return value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{path}: {value!r} must be a mapping")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # YAML reads 1.5e6 as a float
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ParamsError(f"{path}: {value!r} has the wrong type; expected {_type_name(hint)}")
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))
