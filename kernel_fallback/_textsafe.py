"""Text from logs and the environment, made safe to print on a terminal.

A log line is input from anyone who can write to the log directory: a kernel name
holding ESC sequences could recolour or rewrite the terminal, a CR or LF could forge
a row of a report, a lone surrogate (valid in JSON) cannot be encoded at all. Every
character that is not printable (``str.isprintable()``: control characters, format
characters such as bidirectional overrides, line and paragraph separators,
surrogates, unassigned code points) is written as its Python escape (``\\x1b``,
``\\n``, ``\\u202e``, ``\\ud800``).
"""

from __future__ import annotations

from typing import TextIO

__all__ = ["safe", "safe_lines"]


def _escape(char: str) -> str:
    return char.encode("unicode_escape", errors="backslashreplace").decode("ascii")


def safe(text: str) -> str:
    """``text`` with every non-printable character (LF included) escaped."""
    if text.isprintable():  # the common case, in C
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def safe_lines(text: str, out: TextIO) -> None:
    """Print ``text``: its lines as lines, everything else in them escaped."""
    for line in text.split("\n"):
        print(safe(line), file=out)
