"""Retrieval's user-facing errors, importable without FAISS (launchers catch them to print one line)."""


class PassageError(ValueError):
    """A passage store that is missing, malformed or asked for something it does not hold."""


class RetrievalIndexError(ValueError):
    """An index spec, folder or operation that cannot work; the message names the field or file."""


class AccessTokenError(ValueError):
    """The index service's access token file is missing, unreadable or empty; the message names the file."""
