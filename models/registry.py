"""Named tables of layers and models, each entry added by one registration call.

A mixer registers once, ``MIXERS.register("H", "h3", H3)`` (in ``models/mixers/__init__.py``), a
feed-forward likewise in ``models/ffn/__init__.py``, a whole model as ``ARCHS.register("lm", LanguageModel)``
(``models/architectures.py``). The symbol is the entry's letter in ``model.layers`` / ``model.ffn``; the
name is what ``model.options`` and error messages use, unique across all tables. The tables hold the
imported classes themselves: importing a family's package fills its table.
"""

from __future__ import annotations

from torch import nn

from hybrid_pretrain.base.errors import ConfigError

_names: dict[str, str] = {}  # every registered name -> the table it is in (names key model.options)
_options: dict[str, type] = {}  # name -> the dataclass of its model.options.<name> section, if it has one


class Registry:
    """name -> class (and, for layers, symbol -> name) of one kind of building block."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[nn.Module]] = {}
        self._symbols: dict[str, str] = {}

    def register(self, name: str, cls: type[nn.Module], symbol: str | None = None,
                 options: type | None = None) -> type[nn.Module]:
        """Add ``cls`` as ``name`` (pattern letter ``symbol``; ``options``: its options dataclass); names are unique."""
        if name in _names:
            raise ValueError(f"'{name}' is already registered as a {_names[name]}")
        if symbol is not None and (len(symbol) != 1 or symbol == "|" or symbol in self._symbols):
            raise ValueError(f"{self.kind} symbol {symbol!r} for '{name}' must be one new character other than '|'")
        _names[name] = self.kind
        if options is not None:
            _options[name] = options
        self._classes[name] = cls
        if symbol is not None:
            self._symbols[symbol] = name
        return cls

    def get(self, name: str) -> type[nn.Module]:
        """The class registered as ``name``; ConfigError naming the choices if there is none."""
        if name not in self._classes:
            raise ConfigError(f"unknown {self.kind} '{name}'; registered: {', '.join(sorted(self._classes))}")
        return self._classes[name]

    def symbols(self) -> dict[str, str]:
        """symbol -> name, in registration order."""
        return dict(self._symbols)

    def names(self) -> list[str]:
        return list(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def items(self) -> list[tuple[str, type[nn.Module]]]:
        return list(self._classes.items())


def registered_names() -> set[str]:
    """Every name in every table filled so far (the keys ``model.options`` accepts)."""
    return set(_names)


def options_class(name: str) -> type | None:
    """The dataclass ``model.options.<name>`` is read into, or None for an entry without options."""
    return _options.get(name)
