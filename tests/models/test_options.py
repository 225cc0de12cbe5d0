"""Per-layer options: read through a dataclass of defaults, checked for unknown keys and types."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.architectures import validate_model
from hybrid_pretrain.models.config import ModelConfig
from hybrid_pretrain.models.options import layer_options
from hybrid_pretrain.training.config import load_config


@dataclass
class MegaLikeOptions:
    chunk_size: int = 64
    bidirectional: bool = False
    decay: float = 0.5


def test_defaults_then_given_values() -> None:
    cfg = ModelConfig(options={"mega": {"chunk_size": 16, "decay": 1}})
    opts = layer_options(cfg, "mega", MegaLikeOptions)
    assert (opts.chunk_size, opts.bidirectional, opts.decay) == (16, False, 1)
    assert layer_options(ModelConfig(), "mega", MegaLikeOptions) == MegaLikeOptions()


def test_unknown_key_and_wrong_type_name_the_option() -> None:
    with pytest.raises(ConfigError, match=r"'model.options.mega.chunk' .*did you mean 'model.options.mega.chunk_size'"):
        layer_options(ModelConfig(options={"mega": {"chunk": 16}}), "mega", MegaLikeOptions)
    with pytest.raises(ConfigError, match=r"model.options.mega.bidirectional must be bool, got int"):
        layer_options(ModelConfig(options={"mega": {"bidirectional": 1}}), "mega", MegaLikeOptions)


def test_config_validates_option_names_and_arch() -> None:
    with pytest.raises(ConfigError, match="no mixer, ffn or arch is registered as 'megaa'"):
        validate_model(ModelConfig(options={"megaa": {}}))
    with pytest.raises(ConfigError, match="model.arch 'gpt5' is not registered"):
        validate_model(ModelConfig(arch="gpt5"))


def test_overrides_merge_into_yaml_options(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  options:\n    mega: {chunk_size: 8, ema_dim: 4}\n")
    cfg = load_config(str(path), ["model.options.mega.z_dim=16"])
    assert cfg.model.options == {"mega": {"chunk_size": 8, "ema_dim": 4, "z_dim": 16}}
    # Option sections are checked against the layer's options when the config loads, not only at build time.
    with pytest.raises(ConfigError, match="unknown config key 'model.options.mega.decay'"):
        load_config(str(path), ["model.options.mega.decay=0.5"])
    with pytest.raises(ConfigError, match="'attention' takes no options"):
        load_config(str(path), ["model.options.attention.x=1"])
    with pytest.raises(ConfigError, match="model.options must be a mapping"):
        load_config(str(path), ["model.options=3"])
