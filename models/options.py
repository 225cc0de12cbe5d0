"""Per-layer options: ``model.options.<registered name>.<key>``, e.g. ``model.options.mega.chunk_size=64``.

Each mixer, feed-forward or architecture declares its options as a dataclass of defaults and reads them
with `layer_options`; they go through the project's one config loader (``base.typed_config``), so a key
the layer does not declare fails naming the key and the known ones, values are typed exactly as in the
run config (``dt_min=1e-3`` from the command line is a float here too), and new layers need no new
top-level ModelConfig fields.
"""

from __future__ import annotations

from typing import TypeVar

from hybrid_pretrain.base.typed_config import build
from hybrid_pretrain.models.config import ModelConfig

T = TypeVar("T")


def layer_options(cfg: ModelConfig, name: str, defaults: type[T]) -> T:
    """``defaults`` updated from ``cfg.options[name]``, checked; then the options' own ``validate(name)``."""
    opts = build(defaults, cfg.options.get(name) or {}, prefix=f"model.options.{name}.", source="model.options")
    check = getattr(opts, "validate", None)
    if check is not None:
        check(name)
    return opts
