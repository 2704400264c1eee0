"""Fallback events: exact counters, first-occurrence logging through structlog.

Every fallback the library takes is *recorded* here. Recording is cheap (one lock,
one dict lookup, one increment); only the first occurrence of each
(kind, kernel, subject, policy) key is *logged*, so a hot loop costs one warning and
an exact count. ``reset_stats()`` clears the counts and re-arms logging.

Repeats of a keyword fallback cost less still: once its key has been logged, and while
no listener is registered, the decorated kernel only ticks the key's :class:`Counter`
(an ``itertools.count``, atomic without a lock) and the ticks are added up when counts
are read. A listener, a reset or a CUDA graph capture sends calls back through
:func:`record`, so listeners still see every occurrence.

Where the events go:
- if ``configure_logging()`` (or ``set_logger()``) installed a logger, there;
- else, if ``KERNEL_FALLBACK_LOG_FORMAT`` or ``KERNEL_FALLBACK_LOG_FILE`` is set, to
  the logger they describe (built by :func:`kernel_fallback._sinks.env_logger` at
  the first event, never on import);
- else, if the host configured structlog (``structlog.is_configured()``), through
  the host's structlog pipeline (so ``structlog.testing.capture_logs()`` sees them);
- else through a structlog logger wrapped around the standard library logger
  ``"kernel_fallback"``, so the host's ``logging`` set-up decides what is shown.
Nothing is configured globally on import.

Layering is one way: this module imports :mod:`kernel_fallback._sinks` (log files,
writers, the environment's logger, ``add_process_info``), which imports neither it nor
:mod:`kernel_fallback._logging`; ``_logging`` (``configure_logging()``) imports both,
and this module never imports it. So a process that only decorates kernels still
writes the log the variables describe.

``flush()`` logs one ``kernel_fallback.summary`` event per counted key, with the
exact count that first-occurrence logging hides; it also runs at interpreter exit
once a fallback has been recorded in the process (see ``_arm_exit_flush``).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import os
import sys
import types
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, final

import structlog
import torch

from kernel_fallback import _config, _reentry, _sinks
from kernel_fallback._counter import Counter as Counter
from kernel_fallback._counter import FallbackEvent as FallbackEvent
from kernel_fallback._counter import Key as Key
from kernel_fallback._event_names import OVERFLOW_EVENT, OVERFLOW_KERNEL, SUMMARY_EVENT

__all__ = [
    "Counter",
    "FallbackEvent",
    "OVERFLOW_EVENT",
    "SUMMARY_EVENT",
    "add_listener",
    "counter",
    "describe_key",
    "emit",
    "flush",
    "note_traced",
    "record",
    "remove_listener",
    "reset_stats",
    "set_logger",
    "stats",
]

#: Distinct keys kept before new ones are folded into one overflow entry; a bound on
#: memory for programs that make kernels (and so names) dynamically.
MAX_ENTRIES: Final = 4096

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Frames of torch itself (Dynamo tracing, functools wrappers) are not the caller.
_SKIP_DIRS = (
    _PACKAGE_DIR + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)
_SKIP_FILES = frozenset({functools.__file__, contextlib.__file__})


@final
@dataclass(slots=True)
class _Entry:
    kind: str
    kernel: str
    subject: str
    policy: str
    fields: Mapping[str, Any]
    count: int = 0
    compiled_traces: int = 0
    graph_captures: int = 0
    first_seen: str = ""
    where: str = ""
    counters: list[Counter] = field(default_factory=list)


# Guards the counts; a signal handler that interrupted its own thread's bookkeeping
# defers its work instead of waiting for ever (see _reentry).
_book = _reentry.Bookkeeping()
# Log handlers and listeners, one at a time per thread, for the same reason.
_outbound = _reentry.Outbound()
_entries: dict[Key, _Entry] = {}
# Held by the kernels (strongly) and by the entries that count them.
_counters: weakref.WeakValueDictionary[Key, Counter] = weakref.WeakValueDictionary()
# Per-key counts of keys folded into the overflow row, while their counters live.
_overflowed: weakref.WeakKeyDictionary[Counter, int] = weakref.WeakKeyDictionary()


class StaticFields(dict[str, Any]):
    """A kernel's static event fields. The kernel holds them; this module only weakly,
    so that kernels made and dropped dynamically leave nothing behind."""


_static_fields: weakref.WeakValueDictionary[Key, StaticFields] = weakref.WeakValueDictionary()
_listeners: list[Callable[[FallbackEvent], None]] = []
_logger_override: Any = None
_log_errors = 0
_epoch = 0
# The atexit registry is inherited by a forked child, so this is not reset at fork.
_atexit_registered = False
_exit_armed_pid = 0
_exit_flushed_pid = 0


def _reinit_after_fork() -> None:
    # A forked child starts with no counts of its own: re-reporting the parent's
    # would double them when logs of many processes are merged.
    global _book, _outbound, _log_errors
    _book = _reentry.Bookkeeping()
    _outbound = _reentry.Outbound()
    _entries.clear()
    _log_errors = 0
    _rearm_counters()


def _rearm_counters() -> None:
    """Detach every counter from the cleared entries; later ticks start from zero."""
    _overflowed.clear()
    for held in list(_counters.values()):
        held.hot = False
        held._drain()
        held._entry = None


os.register_at_fork(after_in_child=_reinit_after_fork)


def _caller_location() -> str:
    """file:line of the first frame outside this package (the kernel's caller)."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_SKIP_DIRS) and filename not in _SKIP_FILES:
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def describe_key(key: Key, fields: Mapping[str, Any]) -> StaticFields:
    """Register the static fields logged with ``key`` (event name, source, reason...).

    Done when a kernel's policies are resolved, so that recording a repeat costs no
    allocation. The caller must keep the returned object alive as long as it may
    record ``key``. A key already counted takes the new fields (its ``source`` after
    ``reload_config()``, say).
    """
    held = StaticFields(fields)
    with _book.entered("describe_key()"):
        _static_fields[key] = held
        entry = _entries.get(key)
        if entry is not None:
            entry.fields = held
    return held


def counter(key: Key) -> Counter:
    """The counter of ``key``, shared by every kernel that records it.

    The caller keeps it alive as long as it may tick it (as with :func:`describe_key`).
    """
    with _book.entered("counter()"):
        held = _counters.get(key)
        if held is None:
            held = _counters[key] = Counter(key)
        return held


def record(
    key: Key, *, compiled: bool = False, captured: bool = False, counter: Counter | None = None
) -> None:
    """Count one fallback; log it if it is the first of its key.

    ``counter`` is the key's :class:`Counter` when the caller may tick it later: the
    occurrence is counted there, and the counter turns hot once the key is logged.

    Called from a signal handler that interrupted this thread inside the library's
    bookkeeping, it is counted as soon as that bookkeeping ends (microseconds later).
    """
    if not _book.enter():
        _book.defer(functools.partial(record, key, compiled=compiled, captured=captured, counter=counter))
        return
    try:
        entry = _entries.get(key)
        if entry is None:
            entry = _new_entry(key)
        if entry.kind == "overflow":
            entry.count += 1
            count = entry.count
            if counter is not None:
                count = _overflowed[counter] = _overflowed.get(counter, 0) + 1
        elif counter is not None:
            if counter._entry is not entry:
                counter._entry = entry
                entry.counters.append(counter)
            counter.tick()
            _drain(entry)
            count = entry.count
        else:
            entry.count += 1
            count = entry.count
        if compiled:
            entry.compiled_traces += 1
        if captured:
            entry.graph_captures += 1
        first = not entry.first_seen
        if first:
            entry.first_seen = datetime.datetime.now(datetime.timezone.utc).isoformat()
            entry.where = _caller_location()
        if counter is not None and entry.kind != "overflow" and not _listeners:
            counter.hot = True
    finally:
        _book.leave()
    if first and _exit_armed_pid != os.getpid():
        _arm_exit_flush()
    # A CUDA graph capture is logged every time, not only first: each capture bakes the
    # fallback into a graph that replays it with no Python (and so no count) at all.
    if first or captured or _listeners:
        _outbound.run(functools.partial(_tell, key, entry, count, first, compiled, captured))


def _tell(key: Key, entry: _Entry, count: int, first: bool, compiled: bool, captured: bool) -> None:
    """Log an occurrence that must be logged, and pass it to every listener."""
    if first or captured:
        _log_first(entry, compiled=compiled, captured=captured)
    if _listeners:
        # Listeners see the kernel's own key, also once its stored row is the overflow row.
        fields = entry.fields if entry.kind != "overflow" else _static_fields.get(key) or {}
        event = FallbackEvent(*key, fields=fields, count=count, compiled=compiled, captured=captured)
        for listener in tuple(_listeners):
            try:
                listener(event)
            except Exception as exc:  # noqa: BLE001 - an observer (metrics...) must not break a kernel call
                _observer_failed(f"listener {listener!r}", exc)


def _drain(entry: _Entry) -> None:
    """Add the ticks of the entry's counters to its count (the caller holds the lock)."""
    for held in entry.counters:
        entry.count += held._drain()


def _collect() -> None:
    """Bring every tick into the entries before counts are read (the caller holds the lock).

    Ticks of a counter detached by a reset, from calls in flight at the reset, get an
    entry of their own here rather than being lost.
    """
    for entry in _entries.values():
        _drain(entry)
    for held in list(_counters.values()):
        if held._entry is None and held._read() > held._drained:
            entry = _entries.get(held.key) or _new_entry(held.key)
            if entry.kind == "overflow":
                ticks = held._drain()
                entry.count += ticks
                _overflowed[held] = _overflowed.get(held, 0) + ticks
            else:
                held._entry = entry
                entry.counters.append(held)
                _drain(entry)


def overflowed_count(held: Counter) -> int:
    """Occurrences of ``held``'s key counted in the overflow row since the last reset."""
    with _book.entered("overflowed_count()"):
        return _overflowed.get(held, 0)


def _new_entry(key: Key) -> _Entry:
    """Create the entry of a key not seen yet (the caller holds the lock)."""
    fields = _static_fields.get(key) or dict(zip(("kind", "kernel", "subject", "policy"), key, strict=True))
    if len(_entries) >= MAX_ENTRIES:
        overflow: Key = ("overflow", OVERFLOW_KERNEL, "", "")
        entry = _entries.get(overflow)
        if entry is None:
            entry = _entries[overflow] = _Entry(*overflow, fields={"first_dropped": dict(fields)})
        return entry
    entry = _entries[key] = _Entry(*key, fields=fields)
    return entry


def _log_first(entry: _Entry, *, compiled: bool, captured: bool) -> None:
    if entry.kind == "overflow":
        _emit_now(OVERFLOW_EVENT, {"max_entries": MAX_ENTRIES, **entry.fields})
        return
    # `kind` lets log readers tell keyword, provider and dispatch events apart.
    extra: dict[str, Any] = {"kind": entry.kind, "where": entry.where}
    if _epoch:
        extra["epoch"] = _epoch
    if compiled:
        extra["compiled"] = True
    if captured:
        extra["cuda_graph_capture"] = True
        if entry.kind == "kwarg" and entry.policy == "warn":
            extra["risk"] = (
                "the graph replays without writing the caller's buffer; "
                "use on_drop='copy' to keep it right under CUDA graphs"
            )
    _emit_now(str(entry.fields.get("event", "kernel_fallback.fallback")), {**entry.fields, **extra})


def note_traced(kind: str, kernel: str, subject: str, policy: str) -> bool:
    """Record a fallback met while torch.compile traces a graph.

    Called from inside a traced function: Dynamo runs it once at trace time
    instead of putting it in the graph, so logging and counting cause no graph
    break. Every later run of the compiled graph takes the same fallback without
    passing through Python, so it is counted once per trace (``compiled_traces``).
    """
    record((kind, kernel, subject, policy), compiled=True)
    return True


# Same marker `torch._dynamo.assume_constant_result` sets; written here so that
# importing kernel_fallback does not import torch._dynamo (about a second).
note_traced._dynamo_marked_constant = True  # type: ignore[attr-defined]


def emit(event: str, fields: Mapping[str, Any]) -> None:
    """Log one event at warning level; a failing handler never reaches the caller.

    From a signal handler that interrupted this thread's own logging (whose handler may
    hold its file's lock), the event is logged when that logging call returns.
    """
    _outbound.run(functools.partial(_emit_now, event, dict(fields)))


def _emit_now(event: str, fields: Mapping[str, Any]) -> None:
    try:
        logger = _logger_override
        if logger is None:
            logger = _env_logger()
        if logger is None and structlog.is_configured():
            logger = structlog.get_logger(_sinks.LOGGER_NAME)
        if logger is None:
            logger = _sinks.stdlib_logger()
        logger.warning(event, **{k: v for k, v in fields.items() if k != "event"})
    except Exception as exc:  # noqa: BLE001 - a log handler must not break a kernel call
        _observer_failed(f"logging {event}", exc)


def _observer_failed(what: str, exc: Exception) -> None:
    """Count a failing log handler or listener; tell stderr about the first one."""
    global _log_errors
    _log_errors += 1
    if _log_errors == 1:
        # If stderr itself is gone there is nothing left to tell.
        with contextlib.suppress(Exception):
            sys.stderr.write(f"kernel_fallback: {what} failed: {exc!r}\n")


def _env_logger() -> Any:
    """The logger KERNEL_FALLBACK_LOG_FORMAT/_LOG_FILE describe, or None when both are unset."""
    snap = _config.snapshot()
    if snap.log_format is None and snap.log_file is None:
        return None
    return _sinks.env_logger(snap)


def flush() -> int:
    """Log one ``kernel_fallback.summary`` event per counted key; return how many.

    Each event carries the key's exact ``count`` (cumulative since start or the last
    :func:`reset_stats`), ``compiled_traces``, ``graph_captures``, ``first_seen`` and
    ``where``, with its static fields (``kernel``, ``kwarg`` or ``provider``,
    ``policy``, ``source``, ``reason``...). Nothing is logged when nothing was counted.
    Runs by itself at interpreter exit once the process has recorded a fallback.

    Called from a signal handler that interrupted this thread inside the library's
    bookkeeping, it returns 0 and runs as soon as that bookkeeping ends (also when the
    handler's ``SystemExit`` unwinds it), so a SIGTERM handler may call it safely.
    """
    if not _book.enter():
        _book.defer(flush)
        return 0
    try:
        _collect()
        summaries = [_summary_fields(e) for e in _entries.values() if e.count]
    finally:
        _book.leave()
    summaries.sort(key=lambda f: (f["kind"], f["kernel"], f.get("kwarg") or f.get("provider"), f["policy"]))
    for fields in summaries:
        emit(SUMMARY_EVENT, fields)
    return len(summaries)


def _summary_fields(entry: _Entry) -> dict[str, Any]:
    subject = {"kwarg": entry.subject} if entry.kind == "kwarg" else {"provider": entry.subject}
    return {
        **{k: v for k, v in entry.fields.items() if k not in ("event", "subject")},
        "kind": entry.kind,
        "kernel": entry.kernel,
        **subject,
        "policy": entry.policy,
        "count": entry.count,
        "compiled_traces": entry.compiled_traces,
        "graph_captures": entry.graph_captures,
        "first_seen": entry.first_seen,
        "where": entry.where,
        **({"epoch": _epoch} if _epoch else {}),
    }


def _arm_exit_flush() -> None:
    """Make sure ``flush()`` runs when this process ends; called at its first fallback.

    A plain exit runs atexit handlers (a forked child inherits them and flushes only
    its own counts, which fork cleared). A multiprocessing child ends with
    ``os._exit()``, which skips them, but first runs finalizers that have an exit priority.
    """
    global _atexit_registered, _exit_armed_pid
    _exit_armed_pid = os.getpid()
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_flush_at_exit)
    mp_process = sys.modules.get("multiprocessing.process")
    if mp_process is not None and mp_process.parent_process() is not None:
        from multiprocessing import util

        util.Finalize(None, _flush_at_exit, exitpriority=0)


def _flush_at_exit() -> None:
    """``flush()`` once per process, whichever exit hook comes first."""
    global _exit_flushed_pid
    pid = os.getpid()
    if _exit_flushed_pid != pid:
        _exit_flushed_pid = pid
        flush()


def set_logger(logger: Any) -> Any:
    """Send events to ``logger`` (``None``: back to the default routing); returns the old one."""
    global _logger_override
    old, _logger_override = _logger_override, logger
    return old


def add_listener(listener: Callable[[FallbackEvent], None]) -> None:
    """Call ``listener`` on every recorded fallback (not only the first of a key).

    While any listener is registered, decorated kernels record every fallback through
    the lock instead of ticking a counter, so that each occurrence reaches it.
    """
    if not _book.enter():
        _book.defer(functools.partial(add_listener, listener))
        return
    try:
        _listeners.append(listener)
        for held in list(_counters.values()):
            held.hot = False
    finally:
        _book.leave()


def remove_listener(listener: Callable[[FallbackEvent], None]) -> None:
    """Stop calling ``listener``; a listener that is not registered is an error."""
    if not _book.enter():
        _book.defer(functools.partial(remove_listener, listener))
        return
    try:
        _listeners.remove(listener)
    finally:
        _book.leave()


def stats() -> list[dict[str, Any]]:
    """Counts of every fallback since start or the last :func:`reset_stats`.

    One dict per (kind, kernel, keyword or provider, policy), sorted, with keys
    ``kind``, ``kernel``, ``kwarg`` (None for provider events), ``provider``
    (None for keyword events), ``policy``, ``source``, ``count`` (exact, also under
    threads), ``compiled_traces`` and ``graph_captures`` (how many of the counted
    occurrences were a torch.compile trace or a CUDA graph capture: each stands for
    every later run of that graph), ``first_seen`` (ISO 8601, UTC) and ``where``
    (file:line of the first caller).
    """
    with _book.entered("stats()"):
        _collect()
        rows = [
            {
                "kind": e.kind,
                "kernel": e.kernel,
                "kwarg": e.subject if e.kind == "kwarg" else None,
                "provider": e.subject if e.kind != "kwarg" else None,
                "policy": e.policy,
                "source": e.fields.get("source"),
                "count": e.count,
                "compiled_traces": e.compiled_traces,
                "graph_captures": e.graph_captures,
                "first_seen": e.first_seen,
                "where": e.where,
            }
            for e in _entries.values()
        ]
    rows.sort(key=lambda r: (r["kind"], r["kernel"], r["kwarg"] or r["provider"] or "", r["policy"]))
    return rows


def log_errors() -> int:
    """How many event emissions failed in a log handler (they never reach the caller)."""
    return _log_errors


def reset_stats() -> None:
    """Clear every count and re-arm first-occurrence logging.

    Later events carry ``epoch`` (how many resets came before), so that log readers add
    up the counts of a process across resets instead of keeping only the last ones.
    """
    global _log_errors, _epoch
    if not _book.enter():
        _book.defer(reset_stats)
        return
    try:
        _entries.clear()
        _rearm_counters()
        _log_errors = 0
        _epoch += 1
    finally:
        _book.leave()
