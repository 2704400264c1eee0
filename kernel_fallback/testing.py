"""Helpers for tests: capture fallbacks as they are recorded. They work without pytest.

>>> from kernel_fallback.testing import capture_fallbacks
>>> with capture_fallbacks() as events:
...     pass  # call kernels
>>> [e.kwarg for e in events]
[]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kernel_fallback._events import FallbackEvent, add_listener, remove_listener

__all__ = ["capture_fallbacks"]


@contextmanager
def capture_fallbacks() -> Iterator[list[FallbackEvent]]:
    """Collect every fallback recorded in the block (each call, not only the first).

    Unlike log capture this sees repeats that deduplicated logging hides, and it
    leaves counters and logging untouched.
    """
    events: list[FallbackEvent] = []
    add_listener(events.append)
    try:
        yield events
    finally:
        remove_listener(events.append)
