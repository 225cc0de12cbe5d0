"""The hybrid stack as one readable string, e.g. ``"HHAH|HAHH"``.

One symbol per layer picks its sequence mixer (the symbols ``models.mixers.MIXERS`` registers); ``|``
cuts pipeline stages. An optional ffn pattern of the same length (without cuts) picks each layer's
feed-forward (``models.ffn.FFNS``); empty means every layer is dense. Validated at config time so a typo fails
before any rank builds a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.models.ffn import FFNS
from hybrid_pretrain.models.mixers import MIXERS


@dataclass(frozen=True)
class LayerPlan:
    """What one layer of the stack holds."""

    mixer: str  # registry name, e.g. "h3"
    ffn: str  # registry name, e.g. "mlp"


@dataclass(frozen=True)
class StackPlan:
    layers: tuple[LayerPlan, ...]
    stage_cuts: tuple[int, ...]  # layer indices where a new pipeline stage begins (excluding 0)

    @property
    def num_stages(self) -> int:
        return len(self.stage_cuts) + 1


def parse_pattern(layers: str, ffn: str = "") -> StackPlan:
    """Turn ``layers``/``ffn`` strings into a StackPlan, or raise ConfigError naming the problem."""
    if not layers or not layers.replace("|", ""):
        raise ConfigError("model.layers must hold at least one layer symbol, e.g. 'HHAH'")
    mixer_symbols, ffn_symbols = MIXERS.symbols(), FFNS.symbols()
    symbols: list[str] = []
    cuts: list[int] = []
    for pos, ch in enumerate(layers):
        if ch == "|":
            if not symbols or pos == len(layers) - 1 or layers[pos + 1] == "|":
                raise ConfigError(
                    f"model.layers '{layers}': '|' at position {pos} must separate two non-empty stages"
                )
            cuts.append(len(symbols))
        elif ch in mixer_symbols:
            symbols.append(ch)
        else:
            known = ", ".join(f"'{k}' ({v})" for k, v in mixer_symbols.items())
            raise ConfigError(
                f"model.layers '{layers}': unknown symbol '{ch}' at position {pos}; expected one of {known} or '|'"
            )
    ffn = ffn or "D" * len(symbols)
    if len(ffn) != len(symbols):
        raise ConfigError(
            f"model.ffn '{ffn}' has {len(ffn)} symbols but model.layers has {len(symbols)} layers"
        )
    for pos, ch in enumerate(ffn):
        if ch not in ffn_symbols:
            known = ", ".join(f"'{k}' ({v})" for k, v in ffn_symbols.items())
            raise ConfigError(f"model.ffn '{ffn}': unknown symbol '{ch}' at position {pos}; expected one of {known}")
    plan = tuple(LayerPlan(mixer_symbols[m], ffn_symbols[f]) for m, f in zip(symbols, ffn))
    return StackPlan(layers=plan, stage_cuts=tuple(cuts))
