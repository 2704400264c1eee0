"""What the events module counts and tells listeners: keys, events, lock-free counters."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, final

__all__ = ["Counter", "FallbackEvent", "Key"]

#: (kind, kernel, subject, policy): kind is "kwarg", "provider" or "dispatch";
#: subject the keyword or the provider chosen.
Key = tuple[str, str, str, str]


@final
@dataclass(frozen=True, slots=True)
class FallbackEvent:
    """One recorded fallback, as passed to listeners (see :mod:`kernel_fallback.testing`)."""

    kind: str
    kernel: str
    subject: str
    policy: str
    fields: Mapping[str, Any]
    count: int
    compiled: bool = False
    captured: bool = False

    @property
    def kwarg(self) -> str | None:
        """The dropped keyword, for ``kind == "kwarg"`` events."""
        return self.subject if self.kind == "kwarg" else None

    @property
    def provider(self) -> str | None:
        """The provider fallen back to, for provider and dispatch events (as in ``stats()``)."""
        return self.subject if self.kind != "kwarg" else None


@final
class Counter:
    """The lock-free count of one key's repeats, ticked by decorated kernels.

    ``hot`` is true while a repeat may be counted by ``tick()`` alone: the key has been
    logged in this epoch, it is stored (not folded into the overflow row) and no
    listener is registered. Anything else clears it and calls go through
    :func:`record`. ``copies`` tells a kernel that the key's policy is ``copy``.
    Counts are read by ticking once more under the lock and subtracting the reads
    (``itertools.count`` cannot be read otherwise on every Python), so a tick is
    counted exactly once whichever side of a read or a reset it falls.
    """

    __slots__ = ("__weakref__", "_drained", "_entry", "_reads", "_ticks", "copies", "hot", "key", "tick")

    def __init__(self, key: Key) -> None:
        self.key = key
        self.hot = False
        self.copies = key[0] == "kwarg" and key[3] == "copy"
        self._ticks = itertools.count()
        self.tick: Callable[[], int] = self._ticks.__next__
        self._reads = 0
        self._drained = 0  # ticks already added to an entry, or discarded by a reset
        self._entry: object | None = None  # the _events entry that counts its ticks

    def _read(self) -> int:
        """Ticks so far (the caller holds the lock)."""
        ticks = next(self._ticks) - self._reads
        self._reads += 1
        return ticks

    def _drain(self) -> int:
        """Ticks not yet added anywhere (the caller holds the lock)."""
        ticks = self._read()
        new, self._drained = ticks - self._drained, ticks
        return new
