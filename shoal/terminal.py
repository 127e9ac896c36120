"""Text from outside (node ids, NACK errors, annotation values, type URLs)
made safe to print and to log: a terminal obeys control characters, so a
proxy's error message must not be able to move the cursor, recolour the
screen or ring a bell in an operator's shell."""

from __future__ import annotations

import logging
import unicodedata
from typing import Any

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROL_KEEP_LINES = {c: v for c, v in _CONTROL.items() if c != 0x0A}


def printable(text: str, limit: int | None = 200) -> str:
    """`text` with control characters escaped, and cut at `limit`
    characters (saying by how much) unless `limit` is None. Besides the C0
    and C1 controls, Unicode's invisible format characters are escaped too:
    a right-to-left override or a zero-width space would let one node id
    look like another."""
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    text = text.translate(_CONTROL)
    return text if text.isascii() else "".join(map(_visible, text))


def _visible(char: str) -> str:
    if unicodedata.category(char) in _INVISIBLE:
        return f"\\u{ord(char):04x}"
    return char


# Format characters (bidi overrides, zero-width joiners), line and paragraph
# separators, and code points with no character.
_INVISIBLE = frozenset({"Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def has_control(text: str) -> bool:
    return text != printable(text, None)


def lines(text: str) -> str:
    """Multi-line output (a table, a report, a traceback) with every control
    character but the line break escaped."""
    text = text.translate(_CONTROL_KEEP_LINES)
    return text if text.isascii() else "".join(map(_visible, text))


class Formatter(logging.Formatter):
    """One log record, one line: its message cannot carry control characters
    (nor forge a line of its own); a traceback, added after, keeps its
    line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record), None)

    def formatException(self, ei: Any) -> str:
        return lines(super().formatException(ei))
