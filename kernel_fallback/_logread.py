"""Read kernel_fallback's JSON-lines logs from many processes and merge them into counts.

What is read: one JSON object per line (files written with
``KERNEL_FALLBACK_LOG_FORMAT=json``, gzip-compressed or not, or ``-`` for standard
input). A line is one of our events when it is an object whose ``event`` starts with
``kernel_fallback.`` (or whose ``kernel_fallback`` member is such an object, as a JSON
formatter of the standard ``logging`` route writes it). Every other line (other
programs' logs, console-format lines) is ignored and counted. A line that names one
of our events but is not valid JSON (cut short by a killed process or a full disk,
damaged, nested too deep, over 1 MiB) is *malformed*: counted, reported and skipped.
An event of ours with a missing or mistyped field is an error that names the file and
line: a CI gate must not pass on a log it could not read.

Files are streamed line by line (see :mod:`kernel_fallback._loglines`) and merged as
they are read: memory grows with the number of distinct processes and keys, never
with the size of the logs.

How counts are merged: a process is identified by its ``instance`` (a random id the
writer adds to every event), else, in logs written before it existed, by ``host`` and
``pid`` (by its file when an event has no pid). Counts, epochs, pids and ranks above
:data:`MAX_INTEGER` make the line malformed. Per process and key (kernel, keyword or provider, policy),
the latest ``kernel_fallback.summary`` event of each ``epoch`` (resets before it) is
authoritative: its count is exact and cumulative within the epoch, and epochs add up.
A process that logged the first occurrence but no summary
(killed before exit, or ``flush()`` never reached) counts as at least the number of
first-occurrence events it logged, and the merged count is marked inexact. Events
below warning level (``level`` info or debug) are ours but not fallbacks.
"""

from __future__ import annotations

import datetime
import json
import os
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, final

from kernel_fallback._event_names import EVENT_PREFIX, OVERFLOW_EVENT, OVERFLOW_KERNEL, SUMMARY_EVENT
from kernel_fallback._loglines import LineReadError, read_lines, shown_path
from kernel_fallback.exceptions import KernelFallbackError

__all__ = ["FallbackRow", "LogInputError", "LogReport", "read_logs"]

_NOT_FALLBACK_LEVELS: Final = frozenset({"debug", "info", "notset"})
_SUBJECT_FIELDS: Final = ("kwarg", "provider", "chosen", "subject")

#: (kernel, keyword or provider, policy). The kind (kwarg, provider, dispatch) is not
#: part of it: summaries state it, first-occurrence events of providers do not.
Key = tuple[str, str, str]
_MARKER: Final = EVENT_PREFIX.encode()
#: Values quoted in error messages are cut short: a hostile line must not make one huge
#: (or deep enough to exhaust the stack when printed).
_REPR: Final = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


#: The largest count, epoch, pid or rank read (a signed 64-bit integer): a line with a
#: larger one is malformed. Sums of many such stay far below the 4300 digits above
#: which Python refuses to print an integer.
MAX_INTEGER: Final = (1 << 63) - 1


class LogInputError(KernelFallbackError, ValueError):
    """A log file cannot be read, or holds an event of ours that is malformed."""


class _OutOfRange(Exception):
    """An integer field beyond :data:`MAX_INTEGER`: the line is counted as malformed."""


@final
@dataclass(slots=True)
class _PerProcess:
    """What one process logged about one key."""

    first_events: int = 0
    summary_count: int | None = None
    summary_time: datetime.datetime | None = None
    compiled_traces: int = 0
    graph_captures: int = 0
    first_seen: datetime.datetime | None = None
    where: str = ""


@final
@dataclass(slots=True)
class FallbackRow:
    """One merged key: its count over every process, and where it was first seen."""

    kind: str
    kernel: str
    subject: str
    policy: str
    count: int = 0
    exact: bool = True
    processes: int = 0
    first_seen: str = ""
    where: str = ""
    reason: str | None = None
    source: str | None = None
    compiled_traces: int = 0
    graph_captures: int = 0
    ranks: list[Any] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready data, with ``kwarg``/``provider`` as in :func:`stats`."""
        return {
            "kind": self.kind,
            "kernel": self.kernel,
            "kwarg": self.subject if self.kind == "kwarg" else None,
            "provider": self.subject if self.kind != "kwarg" else None,
            "policy": self.policy,
            "count": self.count,
            "exact": self.exact,
            "processes": self.processes,
            "first_seen": self.first_seen,
            "where": self.where,
            "reason": self.reason,
            "source": self.source,
            "compiled_traces": self.compiled_traces,
            "graph_captures": self.graph_captures,
            "ranks": self.ranks,
            "hosts": self.hosts,
        }


@final
@dataclass(slots=True)
class LogReport:
    """Merged fallbacks of a set of log files, and what was read."""

    rows: list[FallbackRow]
    files: list[str]
    lines: int
    events: int
    ignored: int
    processes: int
    #: Ignored lines that still name one of our events (a console-format log, say):
    #: fallbacks this reader could not count.
    unreadable_ours: int = 0
    #: Lines that name one of our events but are not valid JSON (cut short, damaged,
    #: nested too deep, over-long): skipped and counted.
    malformed: int = 0
    #: ``file:line`` of the first malformed line, for the message.
    first_malformed: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "fallbacks": [row.as_dict() for row in self.rows],
            "files": self.files,
            "lines": self.lines,
            "events": self.events,
            "ignored_lines": self.ignored,
            "unreadable_event_lines": self.unreadable_ours,
            "malformed_lines": self.malformed,
            "processes": self.processes,
        }


def _parse_time(value: object) -> datetime.datetime | None:
    """An ISO 8601 time as an aware UTC datetime (a naive one is taken as UTC)."""
    if not isinstance(value, str) or not value:
        return None
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        parsed = datetime.datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=datetime.timezone.utc)
        return parsed.astimezone(datetime.timezone.utc)
    except (ValueError, OverflowError):  # not a time, or out of range once in UTC (year 1, +01:00)
        return None


def format_time(value: datetime.datetime | None) -> str:
    """ISO 8601 UTC with a ``Z``, or an empty string."""
    return "" if value is None else value.isoformat().replace("+00:00", "Z")


def _our_event(obj: object) -> dict[str, Any] | None:
    """The kernel_fallback event a parsed line holds, or None when it holds none."""
    if not isinstance(obj, dict):
        return None
    nested = obj.get("kernel_fallback")
    if isinstance(nested, dict) and isinstance(nested.get("event"), str):
        obj = nested
    event = obj.get("event")
    if isinstance(event, str) and event.startswith(EVENT_PREFIX):
        return obj
    return None


def _key_of(event: dict[str, Any], where: str) -> tuple[Key, str, bool] | None:
    """(key, kind, whether the event states its kind) of a fallback event; None for others."""
    name = event["event"][:80]
    level = event.get("level")
    if isinstance(level, str) and level.lower() in _NOT_FALLBACK_LEVELS:
        return None
    if name == OVERFLOW_EVENT:
        return (OVERFLOW_KERNEL, "", ""), "overflow", True
    if "kernel" not in event:
        return None
    kernel = event["kernel"]
    if not isinstance(kernel, str) or not kernel:
        raise LogInputError(
            f"{where}: {name} event: 'kernel' must be a non-empty string, got {_REPR.repr(kernel)}."
        )
    kind = event.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise LogInputError(f"{where}: {name} event: 'kind' must be a string, got {_REPR.repr(kind)}.")
    stated = kind is not None
    subject = None
    for candidate in _SUBJECT_FIELDS:
        if isinstance(subject := event.get(candidate), str):
            break
    else:
        subject = None
    if kind is None:
        if isinstance(event.get("kwarg"), str):
            kind = "kwarg"
        else:
            kind = "dispatch" if name == "kernel_fallback.dispatch" else "provider"
    if subject is None:
        if kind != "overflow":
            raise LogInputError(
                f"{where}: {name} event for kernel {_REPR.repr(kernel)} names no keyword or provider "
                f"(one of {', '.join(_SUBJECT_FIELDS)} must be a string)."
            )
        subject = ""
    policy = event.get("policy", "")
    if not isinstance(policy, str):
        raise LogInputError(f"{where}: {name} event: 'policy' must be a string, got {_REPR.repr(policy)}.")
    return (kernel, subject, policy), kind, stated


def _count_field(event: dict[str, Any], name: str, where: str, *, required: bool) -> int:
    value = event.get(name)
    if value is None and not required:
        return 0
    # type() rather than isinstance(): a bool is an int, and is no count.
    if type(value) is not int or value < 0:
        raise LogInputError(
            f"{where}: {event['event'][:80]} event: {name!r} must be a non-negative integer, "
            f"got {_REPR.repr(value)}."
        )
    if value > MAX_INTEGER:
        raise _OutOfRange
    return value


def _scalar_field(event: dict[str, Any], name: str, where: str) -> int | str | None:
    """An identifying field (``pid``, ``host``, a rank): a string, an integer or absent."""
    value = event.get(name)
    if type(value) is int and not -MAX_INTEGER <= value <= MAX_INTEGER:
        raise _OutOfRange
    if value is None or type(value) in (int, str):  # not bool, nor a subclass
        return value
    raise LogInputError(
        f"{where}: {event['event'][:80]} event: {name!r} must be a string or an integer, "
        f"got {_REPR.repr(value)}."
    )


@final
class _Merger:
    """Accumulates events file by file, then merges per key."""

    def __init__(self) -> None:
        self.per: dict[Key, dict[tuple[str, str, str], _PerProcess]] = {}
        self.info: dict[Key, dict[str, Any]] = {}
        self.kinds: dict[Key, tuple[str, bool]] = {}
        self.ranks: dict[Key, set[Any]] = {}
        self.hosts: dict[Key, set[str]] = {}
        self.processes: set[tuple[str, str]] = set()
        self.lines = self.events = self.ignored = self.unreadable_ours = self.malformed = 0
        self.first_malformed = ""

    def add_file(self, path: str) -> None:
        shown = shown_path(path)
        for lineno, line, whole in read_lines(path):
            self.lines += 1
            # Most lines of a shared log are not ours: skip them before decoding or parsing.
            if _MARKER not in line:
                self.ignored += not line.isspace()
                continue
            if not whole:  # over-long: not an event we could hold, nor one we write
                self._malformed(f"{shown}:{lineno}")
                continue
            text = line.decode("utf-8", errors="replace").strip()
            if not text.startswith("{"):
                # Console-format lines, or other programs quoting our event names.
                self.ignored += 1
                self.unreadable_ours += 1
                continue
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                # Cut short by a killed process or a full disk, or nested deeper than the
                # parser's stack: not an event we can read, and not worth failing a run for.
                self._malformed(f"{shown}:{lineno}")
                continue
            event = _our_event(obj)
            if event is None:
                self.ignored += 1
                continue
            try:
                self._add_event(event, f"{shown}:{lineno}", shown)
            except _OutOfRange:  # checked before anything is merged: the line is skipped whole
                self._malformed(f"{shown}:{lineno}")
                continue
            self.events += 1

    def _malformed(self, where: str) -> None:
        self.malformed += 1
        self.first_malformed = self.first_malformed or where

    def _add_event(self, event: dict[str, Any], where: str, path: str) -> None:
        found = _key_of(event, where)
        if found is None:
            return
        key, kind, stated = found
        # Every field is read and checked before anything is merged, so that a line
        # refused half-way leaves no trace.
        pid = _scalar_field(event, "pid", where)
        host = _scalar_field(event, "host", where)
        instance = event.get("instance")
        if isinstance(instance, str) and instance:
            # A random id per process: ranks in separate PID namespaces share host and pid.
            process = ("instance", instance[:80])
        elif pid is not None:
            process = (str(host or ""), str(pid))
        else:
            process = ("", f"file:{path}")
        # Counts restart at each reset_stats(): a process's summaries of different
        # epochs add up, and only the latest of one epoch is authoritative.
        epoch = _count_field(event, "epoch", where, required=False)
        rank = _scalar_field(event, "rank", where)
        if rank is None:
            rank = _scalar_field(event, "local_rank", where)
        summary = event["event"] == SUMMARY_EVENT
        if summary:
            count = _count_field(event, "count", where, required=True)
            compiled = _count_field(event, "compiled_traces", where, required=False)
            captures = _count_field(event, "graph_captures", where, required=False)
        # A kind an event states (summaries do) wins over one inferred from the fields.
        if key not in self.kinds or (stated and not self.kinds[key][1]):
            self.kinds[key] = (kind, stated)
        self.processes.add(process)
        states = self.per.setdefault(key, {})
        state = states.get(state_key := (*process, str(epoch)))
        if state is None:  # not built on every line: most lines update a known state
            state = states[state_key] = _PerProcess()
        info = self.info.setdefault(key, {})
        if len(info) < 2:  # the first reason and source of a key are kept
            for name in ("reason", "source"):
                if isinstance(event.get(name), str):
                    info.setdefault(name, event[name])
        if rank is not None:
            self.ranks.setdefault(key, set()).add(rank)
        if host is not None:
            self.hosts.setdefault(key, set()).add(str(host))
        stamp = _parse_time(event.get("timestamp"))
        caller = event.get("where") if isinstance(event.get("where"), str) else ""
        if summary:
            if state.summary_time is None or stamp is None or stamp >= state.summary_time:
                state.summary_count = count
                state.summary_time = stamp or state.summary_time
                state.compiled_traces = compiled
                state.graph_captures = captures
            seen = _parse_time(event.get("first_seen")) or stamp
        else:
            state.first_events += 1
            seen = stamp
        if seen is not None and (state.first_seen is None or seen < state.first_seen):
            state.first_seen, state.where = seen, str(caller or state.where)
        elif not state.where and caller:
            state.where = str(caller)

    def report(self, files: list[str]) -> LogReport:
        rows = []
        for key, processes in self.per.items():
            row = FallbackRow(self.kinds[key][0], *key)
            earliest: datetime.datetime | None = None
            for state in processes.values():
                if state.summary_count is None:
                    row.exact = False
                    row.count += state.first_events
                else:
                    row.count += state.summary_count
                row.compiled_traces += state.compiled_traces
                row.graph_captures += state.graph_captures
                if state.first_seen is not None and (earliest is None or state.first_seen < earliest):
                    earliest, row.where = state.first_seen, state.where
                elif not row.where:
                    row.where = state.where
            if row.count == 0:  # only summaries saying 0 (after reset_stats): nothing happened
                continue
            row.processes = len({state_key[:2] for state_key in processes})
            row.first_seen = format_time(earliest)
            row.reason = self.info[key].get("reason")
            row.source = self.info[key].get("source")
            row.ranks = sorted(self.ranks.get(key, ()), key=lambda r: (not isinstance(r, int), str(r)))
            row.hosts = sorted(self.hosts.get(key, ()))
            rows.append(row)
        rows.sort(key=lambda r: (r.kernel, r.kind, r.subject, r.policy))
        return LogReport(
            rows,
            files,
            self.lines,
            self.events,
            self.ignored,
            len(self.processes),
            self.unreadable_ours,
            self.malformed,
            self.first_malformed,
        )


def read_logs(paths: Iterable[str | os.PathLike[str]]) -> LogReport:
    """Read and merge JSON-lines logs; raises :class:`LogInputError` naming the bad file or line."""
    files = [os.fspath(p) for p in paths]
    merger = _Merger()
    for path in files:
        try:
            merger.add_file(path)
        except LineReadError as exc:
            raise LogInputError(str(exc)) from exc
    return merger.report(files)
