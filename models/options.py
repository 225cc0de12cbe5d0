"""Per-layer options: ``model.options.<registered name>.<key>``, e.g. ``model.options.mega.chunk_size=64``.

Each mixer, feed-forward or architecture declares its options as a dataclass of defaults and reads them
with `layer_options`; a key it does not declare fails naming the key and the known ones, so new layers
need no new top-level ModelConfig fields.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TypeVar

from hybrid_pretrain.models.config import ConfigError, ModelConfig

T = TypeVar("T")


def layer_options(cfg: ModelConfig, name: str, defaults: type[T]) -> T:
    """``defaults(**cfg.options[name])``, checked: unknown keys and wrong types raise ConfigError."""
    given = cfg.options.get(name, {}) or {}
    if not isinstance(given, dict):
        raise ConfigError(f"model.options.{name} must be a mapping of option -> value, got {given!r}")
    fields = {f.name: f for f in dataclasses.fields(defaults)}
    for key, value in given.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(fields) or 'none'}"
            raise ConfigError(f"unknown option model.options.{name}.{key}; {hint}")
        default = fields[key].default
        if default is not dataclasses.MISSING and default is not None and not _same_kind(value, default):
            raise ConfigError(
                f"model.options.{name}.{key} must be {type(default).__name__}, got {type(value).__name__} {value!r}"
            )
    opts = defaults(**given)
    check = getattr(opts, "validate", None)
    if check is not None:
        check(name)
    return opts


def _same_kind(value: object, default: object) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))
