"""The index service's access token: read from a file or the environment at start-up, kept in memory only.

A token in a config would be written to the run's ``config.yaml`` and copied into every converted
checkpoint, so configs and the command line name a *file* (``--token-file``, ``retrieval.token_file``)
or leave it to ``$RETRIEVAL_TOKEN``; the token itself is never written anywhere.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from hybrid_pretrain.retrieval.errors import AccessTokenError

TOKEN_ENV = "RETRIEVAL_TOKEN"


def read_token(token_file: str | Path | None = None) -> str | None:
    """The token in `token_file` (surrounding whitespace dropped), else $RETRIEVAL_TOKEN, else None."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise AccessTokenError(f"token file '{token_file}' cannot be read ({e}); expected a text file holding "
                                   "the index service's access token") from None
        if not token:
            raise AccessTokenError(f"token file '{token_file}' is empty; expected the index service's access token")
        return token
    return os.environ.get(TOKEN_ENV) or None


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries `token`, compared in constant time."""
    return hmac.compare_digest((header or "").encode("utf-8", "replace"), f"Bearer {token}".encode())
