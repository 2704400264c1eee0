"""Locks a signal handler can call into: what ``_events`` uses so that a handler never deadlocks.

A Python signal handler runs on the main thread between two bytecodes of whatever that
thread was doing, possibly inside the library's own bookkeeping (``record()`` holding
the events lock) or inside a logging handler that holds its file's lock. A handler
that calls ``flush()`` or a decorated kernel (SIGTERM handlers flush at shutdown) would
then wait for a lock its own thread holds, for ever.

- :class:`Bookkeeping`: a re-entrant lock plus a "busy" mark. A caller that finds its
  own thread busy (it is a handler that interrupted the bookkeeping) does not touch the
  state: it defers its work, which runs as soon as the interrupted section ends (also
  when the handler's exception, ``SystemExit`` say, unwinds it), before the lock is
  taken by anyone else's next call.
- :class:`Outbound`: the same for calls out of the library (log handlers, listeners),
  per thread: work a handler starts while its thread is inside one waits until that
  one returns.

Neither adds anything to a decorated kernel's per-call fast path, which ticks a counter
without any lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import final

__all__ = ["Bookkeeping", "Outbound"]


@final
class Bookkeeping:
    """A lock guarding shared counts, safe to enter from a signal handler.

    ``enter()`` takes the lock; it returns False (and holds nothing) when the calling
    thread is already inside, which only a signal handler can be: the caller then
    passes its work to ``defer()`` or refuses. ``leave()`` releases and runs what was
    deferred meanwhile.
    """

    __slots__ = ("_busy", "_deferred", "_lock")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._busy = False
        self._deferred: list[Callable[[], object]] = []

    def enter(self) -> bool:
        """Take the lock to change the state; False when this thread is changing it already."""
        self._lock.acquire()
        # Re-entrant lock: the acquire above succeeds at once for the interrupted thread.
        # A handler that ran before `_busy` was set, or after it was cleared, found the
        # state whole and did its work in full, so only a set mark means "interrupted".
        if self._busy:
            self._lock.release()
            return False
        self._busy = True
        return True

    @contextlib.contextmanager
    def entered(self, what: str) -> Iterator[None]:
        """The lock held around a ``with`` block that must answer now (``what``).

        Raises instead of deferring when the thread is inside already: the caller
        waits for an answer that a deferred call could not give.
        """
        if not self.enter():
            raise RuntimeError(
                f"kernel_fallback: {what} was called from a signal handler that interrupted "
                "this thread's own fallback bookkeeping, which it cannot read or change "
                "mid-way; call flush() there (it is deferred by microseconds), or read "
                "counts outside the handler."
            )
        try:
            yield
        finally:
            self.leave()

    def leave(self) -> None:
        """Release the lock taken by a successful ``enter()``; run deferred work."""
        self._busy = False
        self._lock.release()
        if self._deferred:
            self.run_deferred()

    def defer(self, work: Callable[[], object]) -> None:
        """Run ``work`` when the interrupted section leaves (``list.append`` is atomic)."""
        self._deferred.append(work)

    def run_deferred(self) -> None:
        """Run the deferred work, oldest first."""
        while self._deferred:
            try:
                work = self._deferred.pop(0)
            except IndexError:  # taken by a handler that ran in between
                return
            work()


@final
class Outbound:
    """Calls out of the library (log handlers, listeners), one at a time per thread.

    ``run(work)`` runs ``work`` now, or, when the thread is already inside one (a signal
    handler interrupted it), when that one returns: the interrupted call may hold a
    lock of its handler's (a log file's) that the new one would wait for.
    """

    __slots__ = ("_local",)

    def __init__(self) -> None:
        self._local = threading.local()

    def run(self, work: Callable[[], object]) -> None:
        """Run ``work`` now or, when this thread is inside another, right after it."""
        local = self._local
        pending: list[Callable[[], object]] | None = getattr(local, "pending", None)
        if pending is None:
            pending = local.pending = []
        if getattr(local, "active", False):
            pending.append(work)
            return
        local.active = True
        try:
            work()
            while pending:
                pending.pop(0)()
        finally:
            local.active = False
        if pending:  # queued in the instant between the last test and the line above
            self.run(pending.pop(0))
