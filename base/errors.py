"""The exception every layer of the package raises for a user's configuration mistake."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the field and what was expected."""
