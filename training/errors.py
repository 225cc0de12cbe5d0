"""The checkpoint library's user-facing error, apart from the modules that raise it so they can share it."""


class CheckpointError(RuntimeError):
    """No usable checkpoint: every candidate is missing, corrupt or refused; the message names the file."""
