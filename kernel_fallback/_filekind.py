"""What kind of file a mode describes, in words, for errors about log files.

Shared by the log writer (:mod:`kernel_fallback._sinks`) and the log reader
(:mod:`kernel_fallback._loglines`), which both accept only regular files; standard
library only, so the reader stays free of structlog and torch.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from typing import Final

__all__ = ["describe"]

_KINDS: Final[tuple[tuple[Callable[[int], bool], str], ...]] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


def describe(mode: int) -> str:
    """``a FIFO (named pipe)``, ``a character device``, ...: what ``mode`` is, for a message."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")
