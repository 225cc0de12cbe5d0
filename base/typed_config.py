"""The one loader: dicts (YAML files, ``key=value`` overrides) -> typed dataclasses, checked once.

Every config of the project goes through it (the run config, ``model.options.<layer>``, the synthetic
and classify runs), so a value is accepted or refused the same way everywhere: unknown keys fail naming
the key and the closest known one; ints pass where floats are expected, and so do strings YAML 1.1
leaves unparsed (``1e-3``); bools are never taken for numbers; nested dataclasses and mappings merge key
by key. Errors are ``ConfigError`` naming the full dotted key and where the value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hybrid_pretrain.base.errors import ConfigError

T = TypeVar("T")


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` converted to fit ``annotation`` where that is lossless, else ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        return {coerce(f"{key} key", k, key_type): coerce(f"{key}.{k}", v, value_type) for k, v in value.items()}
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        item_type = args[0] if args else Any
        items = [coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {annotation}, got {type(value).__name__} {value!r}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} must be null, got {type(value).__name__} {value!r}")
    if isinstance(value, bool) and annotation is not bool:
        raise ConfigError(f"{key} must be {annotation.__name__}, got bool {value!r}")
    if annotation is float and isinstance(value, int):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is str and value is None:
        return ""
    if not isinstance(value, annotation):
        raise ConfigError(f"{key} must be {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def merge_into(obj: Any, values: Any, prefix: str = "", source: str = "config") -> None:
    """Set fields of dataclass ``obj`` from ``values``, recursing into nested dataclasses and mappings.

    ``prefix`` is the dotted path of ``obj`` in error messages (e.g. ``"model.options.s4."``), ``source``
    where the values came from (a file, an override).
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} in {source} must be a mapping, got "
                          f"{type(values).__name__} {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys: {', '.join(names) or 'none'}"
            raise ConfigError(f"unknown config key '{full}' in {source}; {hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge_into(current, value, f"{full}.", source)
        elif isinstance(current, dict) and isinstance(value, dict):  # mappings merge key by key, deeply
            setattr(obj, key, deep_merge(current, coerce(full, value, hints[key])))
        else:
            setattr(obj, key, coerce(full, value, hints[key]))


def build(cls: type[T], values: Any, prefix: str = "", source: str = "config") -> T:
    """``cls()`` with ``values`` merged in (every field of ``cls`` needs a default)."""
    obj = cls()
    merge_into(obj, values if values is not None else {}, prefix, source)
    return obj


def deep_merge(base: dict, update: dict) -> dict:
    """``base`` updated by ``update``, mappings merged recursively (neither input is modified)."""
    merged = dict(base)
    for k, v in update.items():
        merged[k] = deep_merge(merged[k], v) if isinstance(merged.get(k), dict) and isinstance(v, dict) else v
    return merged


def parse_override(text: str) -> dict:
    """``'train.steps=10'`` -> ``{'train': {'steps': 10}}``, the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.steps=10")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def read_yaml(path: str | Path, example: str = "configs/debug_hybrid.yaml") -> dict:
    """The mapping in the YAML file ``path``; ConfigError if it is missing, unreadable or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist; expected a YAML file such as {example}")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values, got {type(values).__name__}")
    return values
