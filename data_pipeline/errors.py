"""The one exception the data library raises for problems a user can fix."""

from __future__ import annotations


class DataError(RuntimeError):
    """A user-facing data problem; the message names the file or config field and what was expected.

    Kept separate from bugs (which stay ordinary exceptions) so the launcher can print it as one clear
    line instead of a traceback.
    """
