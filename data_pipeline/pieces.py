"""Cutting text into pieces by character count: the one place the pipeline's chunkers share.

Long lines are cut by offsets (linear in their length; re-slicing a remainder again and again would be
quadratic), and lines are joined once per piece.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def cut_long(line: str, size: int) -> tuple[list[str], str]:
    """A line longer than `size` -> (its leading pieces of exactly `size` characters, the last 1..size characters)."""
    cut = (len(line) - 1) // size * size
    return [line[i : i + size] for i in range(0, cut, size)], line[cut:]


def join_lines(lines: Iterable[str], size: int) -> Iterator[str]:
    """Consecutive lines joined into pieces of at least `size` characters (the last one may be shorter).

    A line longer than `size` first gives its leading `size`-character pieces on their own.
    """
    buf: list[str] = []
    total = 0
    for line in lines:
        if len(line) > size:  # minified code or a book without line breaks
            head, line = cut_long(line, size)
            yield from head
        buf.append(line)
        total += len(line)
        if total >= size:
            yield "".join(buf)
            buf, total = [], 0
    if buf:
        yield "".join(buf)
