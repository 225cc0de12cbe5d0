"""Model library: typed config, layer-pattern parsing, mixers, blocks and the language model."""

from models.config import ConfigError, ModelConfig
from models.lm import LanguageModel, count_parameters

__all__ = ["ConfigError", "LanguageModel", "ModelConfig", "count_parameters"]
