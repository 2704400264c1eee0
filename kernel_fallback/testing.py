"""Helpers for tests: capture, forbid or expect fallbacks. They work without pytest.

>>> from kernel_fallback.testing import capture_fallbacks
>>> with capture_fallbacks() as events:
...     pass  # call kernels
>>> [e.kwarg for e in events]
[]

``no_fallbacks()`` fails a block (or a decorated function) in which a fallback that is
not allowed happened; ``expect_fallback()`` fails one in which an expected fallback did
not happen. The pytest plugin (:mod:`kernel_fallback.pytest_plugin`) is built on them.
They see every occurrence through ``_events.add_listener``, in every thread, whether
or not it is logged, and leave counters and logging untouched.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from contextlib import ContextDecorator, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, final

from kernel_fallback._allow import AllowList
from kernel_fallback._events import FallbackEvent, _caller_location, add_listener, remove_listener
from kernel_fallback.exceptions import KernelFallbackError

__all__ = ["FallbackAssertionError", "FallbackGuard", "capture_fallbacks", "expect_fallback", "no_fallbacks"]


class FallbackAssertionError(KernelFallbackError, AssertionError):
    """A fallback happened where none was allowed, or an expected one did not happen.

    An ``AssertionError``, so test runners report a failure, not an error.
    """


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


def _describe_event(event: FallbackEvent) -> str:
    """One fallback in words: ``f: keyword 'out' dropped (policy warn)``."""
    if event.kind == "kwarg":
        return f"{event.kernel}: keyword {event.subject!r} dropped (policy {event.policy})"
    return f"{event.kernel}: fell back to {event.kind} {event.subject!r} (policy {event.policy})"


@final
@dataclass(frozen=True, slots=True)
class _Expectation:
    kernel: str | None
    kwarg: str | None
    provider: str | None

    def matches(self, event: FallbackEvent) -> bool:
        if self.kernel is not None and not fnmatch.fnmatchcase(event.kernel, self.kernel):
            return False
        if self.kwarg is not None:
            return event.kind == "kwarg" and fnmatch.fnmatchcase(event.subject, self.kwarg)
        if self.provider is not None:
            return event.kind != "kwarg" and fnmatch.fnmatchcase(event.subject, self.provider)
        return True

    def __str__(self) -> str:
        fields = (("kernel", self.kernel), ("kwarg", self.kwarg), ("provider", self.provider))
        parts = [f"{name}={value!r}" for name, value in fields if value is not None]
        return f"a fallback with {', '.join(parts)}" if parts else "a fallback"


#: Blocks of expect_fallback() now running: their fallbacks are expected, so a
#: surrounding no_fallbacks() (a strict pytest run) does not count them.
_active_expectations: list[_Expectation] = []


@final
class FallbackGuard(ContextDecorator):
    """The context manager (and decorator) that :func:`no_fallbacks` returns.

    ``events`` holds every fallback recorded while it is active; ``unexpected`` those
    neither allowed nor expected, each with the caller's file:line.
    """

    def __init__(self, allow: AllowList, hint: Callable[[list[str]], str] | None = None) -> None:
        self.allow = allow
        self.hint = hint
        self.events: list[FallbackEvent] = []
        self.unexpected: list[tuple[FallbackEvent, str]] = []

    def _recreate_cm(self) -> FallbackGuard:
        # Used as a decorator, each call gets a fresh guard.
        return FallbackGuard(self.allow, self.hint)

    def _on_event(self, event: FallbackEvent) -> None:
        self.events.append(event)
        if self.allow.allows(event.kernel, event.subject):
            return
        if any(expectation.matches(event) for expectation in tuple(_active_expectations)):
            return
        self.unexpected.append((event, _caller_location()))

    def __enter__(self) -> FallbackGuard:
        add_listener(self._on_event)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        __tracebackhide__ = True  # pytest shows the test's line, not this one
        remove_listener(self._on_event)
        if exc_type is None:  # an exception from the block itself says more; let it through
            self.check()

    def report(self) -> str:
        """The unexpected fallbacks, one line per kind/kernel/subject/policy, with counts."""
        grouped: dict[tuple[str, str, str, str], list[Any]] = {}
        for event, where in self.unexpected:
            key = (event.kind, event.kernel, event.subject, event.policy)
            if key in grouped:
                grouped[key][1] += 1
            else:
                grouped[key] = [event, 1, where]
        lines = []
        for event, count, where in grouped.values():
            reason = event.fields.get("reason")
            lines.append(
                f"  {_describe_event(event)} x{count}, first at {where}" + (f" - {reason}" if reason else "")
            )
        return "\n".join(lines)

    def check(self) -> None:
        """Raise :class:`FallbackAssertionError` if an unexpected fallback was recorded."""
        __tracebackhide__ = True
        if not self.unexpected:
            return
        patterns = sorted({f"{e.kernel}:{e.subject}" for e, _ in self.unexpected})
        hint = (
            self.hint(patterns)
            if self.hint is not None
            else f"Allow them with no_fallbacks(allow={patterns!r}) or "
            f"KERNEL_FALLBACK_ALLOW={','.join(patterns)}."
        )
        raise FallbackAssertionError(f"{len(patterns)} fallback(s) not allowed:\n{self.report()}\n{hint}")


def no_fallbacks(allow: str | Iterable[str] = (), *, env: bool = True) -> FallbackGuard:
    """Fail when a fallback that is not allowed happens in the block or decorated function.

    ``allow`` holds ``kernel:kwarg`` patterns (``kernel:*``, ``*:out``, fnmatch); with
    ``env`` (the default) those in ``KERNEL_FALLBACK_ALLOW`` are allowed too. Fallbacks
    inside an :func:`expect_fallback` block that expects them are allowed. On leaving
    a block that raised nothing, :class:`FallbackAssertionError` lists each fallback
    not allowed with its count and the file:line of its first call.
    """
    allowed = AllowList.parse("no_fallbacks(allow=...)", allow)
    if env:
        allowed = allowed + AllowList.from_env()
    return FallbackGuard(allowed)


@contextmanager
def expect_fallback(
    kernel: str | None = None,
    kwarg: str | None = None,
    provider: str | None = None,
    *,
    count: int | None = None,
) -> Iterator[list[FallbackEvent]]:
    """Fail unless the block records a fallback matching ``kernel``/``kwarg``/``provider``.

    Each given field must match (fnmatch patterns; ``kwarg`` matches keyword drops,
    ``provider`` provider fallbacks); with ``count``, exactly that many matching
    occurrences are required. Yields the list of matching events as they arrive.
    Matching fallbacks are allowed by a surrounding :func:`no_fallbacks`.
    """
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise ValueError(f"expect_fallback(count={count!r}): use a positive integer or None.")
    if kwarg is not None and provider is not None:
        raise ValueError(
            f"expect_fallback(kwarg={kwarg!r}, provider={provider!r}): a fallback drops a keyword "
            "or changes provider, not both; give one of them."
        )
    __tracebackhide__ = True
    expectation = _Expectation(kernel, kwarg, provider)
    matched: list[FallbackEvent] = []
    seen: list[FallbackEvent] = []

    def on_event(event: FallbackEvent) -> None:
        seen.append(event)
        if expectation.matches(event):
            matched.append(event)

    add_listener(on_event)
    _active_expectations.append(expectation)
    try:
        yield matched
    finally:
        _active_expectations.remove(expectation)
        remove_listener(on_event)
    if not matched or (count is not None and len(matched) != count):
        others = sorted({_describe_event(e) for e in seen})
        recorded = "; recorded instead: " + "; ".join(others) if others else "; no fallback was recorded"
        wanted = f"exactly {count} x {expectation}" if count is not None else str(expectation)
        raise FallbackAssertionError(f"expected {wanted}, got {len(matched)}{recorded}.")
