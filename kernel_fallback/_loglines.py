"""The lines of a log file, read in bounded memory whatever the file holds.

Used by :mod:`kernel_fallback._logread`. A file is read as bytes, one line at a
time, never whole: gzip is detected from the content (``-`` is standard input, gzip
or not), a UTF-8 byte order mark at the start of a line is dropped, and of a line
longer than :data:`MAX_LINE_BYTES` only the first piece is kept (for the caller to
tell whose line it was); the rest is skipped in pieces, never held in memory. Lines
are given as bytes: the caller decodes only those that may be its own.
"""

from __future__ import annotations

import gzip
import sys
import zlib
from collections.abc import Iterator
from typing import Final, Protocol

__all__ = ["MAX_LINE_BYTES", "LineReadError", "read_lines", "shown_path"]

#: Longer lines are skipped (an event of ours is a few hundred bytes).
MAX_LINE_BYTES: Final = 1 << 20
_BOM: Final = b"\xef\xbb\xbf"


class LineReadError(OSError):
    """A log cannot be opened or read (missing, a directory, damaged gzip)."""


def shown_path(path: str) -> str:
    """How a path is named in messages: ``<stdin>`` for ``-``."""
    return "<stdin>" if path == "-" else path


class _Stream(Protocol):
    def readline(self, size: int = ..., /) -> bytes: ...

    def close(self) -> None: ...


def _open_binary(path: str) -> tuple[_Stream, list[_Stream]]:
    """(stream to read, streams to close) for ``path``; gzip detected by its magic bytes."""
    if path == "-":
        raw = getattr(sys.stdin, "buffer", None)
        if raw is None:  # closed, or replaced by a text-only stream
            raise OSError("standard input is not a byte stream")
        owned = []
    else:
        raw = open(path, "rb")  # noqa: SIM115 - closed by read_lines
        owned = [raw]
    peek = getattr(raw, "peek", None)
    magic = peek(2)[:2] if peek is not None else b""
    if magic == b"\x1f\x8b":
        unzipped = gzip.GzipFile(fileobj=raw, mode="rb")
        return unzipped, [unzipped, *owned]
    return raw, list(owned)


def read_lines(path: str) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without its BOM, whether it is whole) of ``path``.

    A line that is not whole is over-long: only its first :data:`MAX_LINE_BYTES` are given.

    Raises :class:`LineReadError` naming the file when it cannot be read.
    """
    shown = shown_path(path)
    try:
        stream, owned = _open_binary(path)
    except OSError as exc:
        raise LineReadError(f"{shown}: cannot read: {exc.strerror or exc}") from exc
    try:
        lineno = 0
        while line := stream.readline(MAX_LINE_BYTES):
            lineno += 1
            whole = len(line) < MAX_LINE_BYTES or line.endswith(b"\n")
            if not whole:
                _skip_rest_of_line(stream)
            # A BOM starts a file written by some editors, and the middle of `cat`ed files.
            yield lineno, line[3:] if line.startswith(_BOM) else line, whole
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a truncated .gz raises EOFError.
        raise LineReadError(f"{shown}: cannot read: {exc}") from exc
    finally:
        for stream_ in owned:
            stream_.close()


def _skip_rest_of_line(stream: _Stream) -> None:
    while (piece := stream.readline(MAX_LINE_BYTES)) and not piece.endswith(b"\n"):
        pass
