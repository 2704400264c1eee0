"""Names of the events kernel_fallback logs, shared by the writer and the log reader.

Kept apart from :mod:`kernel_fallback._events` (which imports torch and structlog) so
that ``kernel-fallback report`` and ``check`` can read logs without importing either.
"""

from __future__ import annotations

from typing import Final

__all__ = ["EVENT_PREFIX", "OVERFLOW_EVENT", "OVERFLOW_KERNEL", "SUMMARY_EVENT"]

#: Every event name starts with this; the reader recognises our lines by it.
EVENT_PREFIX: Final = "kernel_fallback."
#: Kernel name of the entry that counts fallbacks past the stored-key bound.
OVERFLOW_KERNEL: Final = "<overflow>"
#: Name of the events ``flush()`` logs, one per counted key.
SUMMARY_EVENT: Final = "kernel_fallback.summary"
OVERFLOW_EVENT: Final = "kernel_fallback.stats_overflow"
