"""Text from outside (node ids, NACK errors, annotation values, type URLs)
made safe to print and to log: a terminal obeys control characters, so a
proxy's error message must not be able to move the cursor, recolour the
screen or ring a bell in an operator's shell."""

from __future__ import annotations

import logging

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROL_KEEP_LINES = {c: v for c, v in _CONTROL.items() if c != 0x0A}


def printable(text: str, limit: int | None = 200) -> str:
    """`text` with control characters escaped, and cut at `limit`
    characters (saying by how much) unless `limit` is None."""
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return text.translate(_CONTROL)


def has_control(text: str) -> bool:
    return text != text.translate(_CONTROL)


def lines(text: str) -> str:
    """Multi-line output (a table, a report) with every control character
    but the line break escaped."""
    return text.translate(_CONTROL_KEEP_LINES)


class Formatter(logging.Formatter):
    """One log record, one line: its message cannot carry control characters
    (nor forge a line of its own); a traceback, added after, keeps its
    line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record), None)
