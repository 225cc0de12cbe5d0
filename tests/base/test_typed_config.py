"""The one config loader: the same value is accepted or refused the same way in every config of the project."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.base.typed_config import build, coerce, merge_into, parse_override
from hybrid_pretrain.models.mixers.s4 import S4Options
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.training.config import load_config


@dataclass
class Inner:
    rate: float = 0.5
    name: str = "x"


@dataclass
class Outer:
    steps: int = 1
    flag: bool = False
    maybe: int | None = None
    sizes: list[int] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    table: dict[str, dict] = field(default_factory=dict)


def test_numbers_and_bools_are_typed_strictly() -> None:
    assert coerce("k", 3, float) == 3.0 and isinstance(coerce("k", 3, float), float)
    assert coerce("k", "1e-3", float) == 1e-3  # YAML 1.1 leaves exponent-only floats as strings
    for value, annotation in ((True, int), (True, float), (1, bool), ("3", int), ("fast", float)):
        with pytest.raises(ConfigError, match="k must be"):
            coerce("k", value, annotation)
    assert coerce("k", None, int | None) is None and coerce("k", 4, int | None) == 4
    assert coerce("k", [1, 2], tuple[int, ...]) == (1, 2)


def test_nested_merge_and_errors_name_the_full_key() -> None:
    cfg = build(Outer, {"steps": 3, "inner": {"rate": 1}, "table": {"a": {"x": 1}}}, source="file.yaml")
    assert cfg.steps == 3 and cfg.inner.rate == 1.0 and cfg.table == {"a": {"x": 1}}
    merge_into(cfg, {"table": {"a": {"y": 2}}}, source="override")
    assert cfg.table == {"a": {"x": 1, "y": 2}}  # mappings merge key by key
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.rat' in file.yaml; did you mean 'inner.rate'"):
        build(Outer, {"inner": {"rat": 1}}, source="file.yaml")
    with pytest.raises(ConfigError, match=r"sizes\[1\] must be int, got str 'b'"):
        build(Outer, {"sizes": [1, "b"]})
    with pytest.raises(ConfigError, match="inner in x must be a mapping"):
        build(Outer, {"inner": 3}, source="x")


def test_run_config_and_layer_options_agree_on_one_value() -> None:
    """The issue's case: `train.lr=1e-3` was accepted while `model.options.s4.dt_min=1e-3` failed (str)."""
    assert parse_override("model.options.s4.dt_min=1e-3") == {"model": {"options": {"s4": {"dt_min": "1e-3"}}}}
    cfg = load_config("configs/debug_s4.yaml", ["train.lr=1e-3", "model.options.s4.dt_min=1e-3"])
    assert cfg.train.lr == 1e-3
    opts = layer_options(cfg.model, "s4", S4Options)
    assert opts.dt_min == 1e-3 and isinstance(opts.dt_min, float)
    with pytest.raises(ConfigError, match="model.options.s4.dt_min must be float, got str 'tiny'"):
        load_config("configs/debug_s4.yaml", ["model.options.s4.dt_min=tiny"])
