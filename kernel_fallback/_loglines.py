"""The lines of a log file, read in bounded memory whatever the file holds.

Used by :mod:`kernel_fallback._logread`. A file is read as bytes, one line at a
time, never whole: gzip is detected from the content (``-`` is standard input, gzip
or not), a UTF-8 byte order mark at the start of a line is dropped, and of a line
longer than :data:`MAX_LINE_BYTES` only the first piece is kept (for the caller to
tell whose line it was); the rest is skipped in pieces, never held in memory. Lines
are given as bytes: the caller decodes only those that may be its own.

Only a regular file is read (a symbolic link to one is followed): a FIFO, a device
(``/dev/zero``, ``/dev/urandom``), a socket or a directory among the log files is
refused at once, naming it, never waited on or read forever. ``/dev/null`` is the one
device read (as empty): it is the documented guard against an unmatched glob. The file is opened
without blocking, so a FIFO with no writer cannot hang the command. Standard input
(``-``) may be a pipe: that is how it is meant to be used.

The work a gzip file may cause is bounded by its compressed size: more than
:data:`MAX_GZIP_RATIO` bytes or :data:`MAX_GZIP_LINES_PER_BYTE` lines per compressed
byte read (after a small allowance) is refused as a decompression bomb. Real logs
compress 5 to 30 times; a few kilobytes of compressed newlines would otherwise be
tens of millions of lines.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import sys
import zlib
from collections.abc import Iterator
from typing import Final, Protocol

from kernel_fallback._filekind import describe

__all__ = [
    "MAX_GZIP_LINES_PER_BYTE",
    "MAX_GZIP_RATIO",
    "MAX_LINE_BYTES",
    "LineReadError",
    "read_lines",
    "shown_path",
]

#: Longer lines are skipped (an event of ours is a few hundred bytes).
MAX_LINE_BYTES: Final = 1 << 20
#: Decompressed bytes allowed per compressed byte of a gzip file (after _GZIP_ALLOWANCE).
MAX_GZIP_RATIO: Final = 100
#: Lines allowed per compressed byte of a gzip file (after _GZIP_ALLOWANCE_LINES): an
#: empty line costs as much work as a short one, and compresses to almost nothing.
MAX_GZIP_LINES_PER_BYTE: Final = 1
_GZIP_ALLOWANCE: Final = 1 << 20
_GZIP_ALLOWANCE_LINES: Final = 1 << 16
_BOM: Final = b"\xef\xbb\xbf"
_READ_FLAGS: Final = (
    os.O_RDONLY
    # Opening a FIFO for reading waits for a writer; without blocking it returns at once.
    | os.O_NONBLOCK
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOCTTY", 0)
)
_ALLOWED: Final = "a log must be a regular file (or - for standard input)"


class LineReadError(OSError):
    """A log cannot be opened or read (missing, a directory, damaged gzip)."""


def shown_path(path: str) -> str:
    """How a path is named in messages: ``<stdin>`` for ``-``."""
    return "<stdin>" if path == "-" else path


class _Stream(Protocol):
    def readline(self, size: int = ..., /) -> bytes: ...

    def close(self) -> None: ...


class _Raw(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _Counted:
    """The compressed stream under a gzip reader, counting the bytes it gives."""

    def __init__(self, raw: _Raw) -> None:
        self.raw = raw
        self.consumed = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self.raw.read(size)
        self.consumed += len(data)
        return data

    def seek(self, offset: int, /) -> int:
        # Only a backward seek on the gzip stream would ask for this; lines are read forward.
        raise io.UnsupportedOperation("a log is read forward only")


def _is_devnull(info: os.stat_result) -> bool:
    """Whether ``info`` is the null device: empty at once, and documented as a placeholder."""
    if not stat.S_ISCHR(info.st_mode):
        return False
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(null.st_mode) and info.st_rdev == null.st_rdev


def _open_regular(path: str) -> int:
    """A descriptor of ``path`` for reading; LineReadError unless it is a regular file."""
    fd = os.open(path, _READ_FLAGS)
    try:
        info = os.fstat(fd)
        mode = info.st_mode
        if not stat.S_ISREG(mode) and not _is_devnull(info):
            what = describe(mode)
            if os.path.islink(path):
                what = f"a symbolic link to {what}"
            raise LineReadError(f"{shown_path(path)}: cannot read: it is {what}; {_ALLOWED}.")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_binary(path: str) -> tuple[_Stream, list[_Stream], _Counted | None]:
    """(stream to read, streams to close, compressed byte counter or None) for ``path``.

    gzip is detected by its magic bytes.
    """
    if path == "-":
        raw = getattr(sys.stdin, "buffer", None)
        if raw is None:  # closed, or replaced by a text-only stream
            raise OSError("standard input is not a byte stream")
        owned = []
    else:
        raw = open(_open_regular(path), "rb")  # noqa: SIM115 - closed by read_lines
        owned = [raw]
    peek = getattr(raw, "peek", None)
    magic = peek(2)[:2] if peek is not None else b""
    if magic == b"\x1f\x8b":
        counted = _Counted(raw)
        unzipped = gzip.GzipFile(fileobj=counted, mode="rb")
        return unzipped, [unzipped, *owned], counted
    return raw, list(owned), None


def _check_expansion(shown: str, counted: _Counted, size: int, lines: int) -> None:
    """Raise when a gzip file has given far more than real logs compress to."""
    compressed = counted.consumed
    if size > _GZIP_ALLOWANCE + MAX_GZIP_RATIO * compressed or lines > (
        _GZIP_ALLOWANCE_LINES + MAX_GZIP_LINES_PER_BYTE * compressed
    ):
        raise LineReadError(
            f"{shown}: cannot read: gzip expands too far ({size} bytes in {lines} lines from "
            f"{compressed} compressed bytes; at most {MAX_GZIP_RATIO} bytes and "
            f"{MAX_GZIP_LINES_PER_BYTE} line per compressed byte are read): refused as a "
            "decompression bomb. If it is a genuine log, decompress it and read that."
        )


def read_lines(path: str) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without its BOM, whether it is whole) of ``path``.

    A line that is not whole is over-long: only its first :data:`MAX_LINE_BYTES` are given.

    Raises :class:`LineReadError` naming the file when it cannot be read.
    """
    shown = shown_path(path)
    try:
        stream, owned, counted = _open_binary(path)
    except LineReadError:
        raise
    except OSError as exc:
        raise LineReadError(f"{shown}: cannot read: {exc.strerror or exc}") from exc
    try:
        lineno = size = 0
        cut = b""  # the first piece of an over-long line, while its rest is skipped
        while piece := stream.readline(MAX_LINE_BYTES):
            size += len(piece)
            if counted is not None:
                _check_expansion(shown, counted, size, lineno + 1)
            ends = len(piece) < MAX_LINE_BYTES or piece.endswith(b"\n")
            if cut:
                if ends:
                    yield lineno, cut, False
                    cut = b""
                continue
            lineno += 1
            # A BOM starts a file written by some editors, and the middle of `cat`ed files.
            line = piece[3:] if piece.startswith(_BOM) else piece
            if ends:
                yield lineno, line, True
            else:
                cut = line  # MAX_LINE_BYTES long: never empty
        if cut:
            yield lineno, cut, False
    except LineReadError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a truncated .gz raises EOFError.
        raise LineReadError(f"{shown}: cannot read: {exc}") from exc
    finally:
        for stream_ in owned:
            stream_.close()
