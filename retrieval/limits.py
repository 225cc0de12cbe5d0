"""What one search request may ask of the index service, and the parsing that enforces it.

Every bound is checked before work is done: the body size from ``Content-Length`` before the body is
read (rows x dim float32, or a generous text size per number for JSON), then rows, ``k`` and
rows x k, so a 32 KB request can no longer ask for 49 MB of results. A violation is a RequestError
carrying a 4xx status and a short reason; nothing a client sends can reach a 500.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

JSON_BYTES_PER_NUMBER = 32  # "-1.2345678901234567e-308," plus spaces: more than any float needs
_K_TEXT = re.compile(r"^[1-9][0-9]{0,8}$")


class RequestError(Exception):
    """A request the service refuses: HTTP `status` (4xx, or 503 when the service is busy) and a short reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServiceLimits:
    """Per-request and per-connection bounds of the index service (the CLI flags of the same names)."""

    max_rows: int = 4096  # query vectors per request
    max_k: int = 1024  # results per query (and never more than the index holds)
    max_results: int = 1 << 20  # rows x k per request: 12 MiB of binary results
    max_connections: int = 64  # connections served at once; more are answered 503 and closed
    request_timeout: float = 10.0  # seconds for a request's line, headers and body to arrive
    idle_timeout: float = 30.0  # seconds a kept-alive connection may wait for its next request

    def validate(self) -> None:
        for name in ("max_rows", "max_k", "max_results", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("request_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive seconds, got {getattr(self, name)}")

    def max_body(self, binary: bool, dim: int) -> int:
        """The largest body a request with at most `max_rows` rows of `dim` numbers can need."""
        per_number = 4 if binary else JSON_BYTES_PER_NUMBER
        return self.max_rows * dim * per_number + (0 if binary else 4096)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_k(k: int, rows: int, ntotal: int, limits: ServiceLimits) -> int:
    """`k` itself already an int: within [1, min(max_k, ntotal)] and rows x k within max_results."""
    top = max(1, min(limits.max_k, ntotal))
    if not 1 <= k <= top:
        raise RequestError(400, f"'k' must be an integer in [1, {top}] (the index holds {ntotal} vectors), "
                                f"got {_short(k)}")
    if rows * k > limits.max_results:
        raise RequestError(413, f"{rows} rows x k={k} = {rows * k} results; at most {limits.max_results} per request, "
                                "split the batch")
    return k


def parse_k_text(values: list[str] | None) -> int:
    """``?k=10`` -> 10; exactly one plain decimal integer, nothing else (no signs, exponents or 'Infinity')."""
    if not values or len(values) != 1 or not _K_TEXT.match(values[0]):
        raise RequestError(400, f"query parameter 'k' must be one positive integer, got {_short(values)}")
    return int(values[0])


def parse_binary(body: bytes, dim: int) -> np.ndarray:
    """float32 little-endian (n, dim) rows -> array; NaN and infinity refused."""
    if not body or len(body) % (4 * dim):
        raise RequestError(400, f"binary body of {len(body)} bytes is not a whole number of float32 rows of "
                                f"dimension {dim}")
    return _finite(np.frombuffer(body, dtype="<f4").reshape(-1, dim))


def parse_json(body: bytes, dim: int, limits: ServiceLimits) -> tuple[np.ndarray, int]:
    """``{"queries": [[...], ...], "k": 10}`` -> (float32 (n, dim), k); types checked, not coerced."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
        raise RequestError(400, f"body is not valid JSON ({type(e).__name__})") from None
    if not isinstance(req, dict) or not isinstance(req.get("queries"), list) or "k" not in req:
        raise RequestError(400, "expected a JSON object {\"queries\": [[numbers]], \"k\": integer}")
    k, rows = req["k"], req["queries"]
    if type(k) is not int:  # bool is an int subclass: true is not 1 here, and 3.0 or "3" are not integers
        raise RequestError(400, f"'k' must be an integer, got {_short(k)}")
    if not rows:
        raise RequestError(400, "'queries' is empty; expected at least one vector")
    if len(rows) > limits.max_rows:
        raise RequestError(413, f"{len(rows)} query rows; at most {limits.max_rows} per request")
    if any(not isinstance(r, list) or len(r) != dim for r in rows):
        raise RequestError(400, f"each query must be a list of {dim} numbers")
    if any(type(v) is not float and type(v) is not int for r in rows for v in r):  # true, "1.5", null: refused
        raise RequestError(400, "queries must hold only numbers (no strings, booleans or nulls)")
    try:
        q = np.array(rows, dtype=np.float64)
    except OverflowError:  # an integer of hundreds of digits
        raise RequestError(400, "queries contain a number beyond float range") from None
    with np.errstate(over="ignore"):  # beyond float32 becomes infinity, refused just below
        return _finite(q.astype(np.float32)), k


def _finite(q: np.ndarray) -> np.ndarray:
    if not np.isfinite(q).all():
        raise RequestError(400, "queries contain NaN or infinity (or numbers beyond float32)")
    return q
