"""Log sinks: the files, writers and structlog chains that kernel_fallback's events go to.

The lowest layer of event logging. It builds and writes sinks, and knows nothing
of who routes events to them: it imports only :mod:`kernel_fallback._config`,
:mod:`kernel_fallback.exceptions`, structlog and the standard library, never
:mod:`kernel_fallback._events` or :mod:`kernel_fallback._logging`. Those two import
it: ``_events`` sends an event to :func:`env_logger` when ``KERNEL_FALLBACK_LOG_FORMAT``
or ``KERNEL_FALLBACK_LOG_FILE`` is set (so whatever imports ``_events``, a decorated
kernel included, gets the log those variables describe), and
``_logging.configure_logging()`` wraps a :class:`_LineWriter` in the processor chain of
``_build``. When nothing is configured, ``_events`` logs through :func:`stdlib_logger`.

Each event is one line, written with a single ``write()`` to a file opened in append
mode, so several processes may share one file without tearing lines. The file name
may hold ``{pid}``, ``{rank}`` (``RANK``, else ``LOCAL_RANK``, else ``0``) and
``{host}``; they are expanded again in a forked child, which then writes its own file.
When the file is renamed or deleted (log rotation), the writer opens the path anew
within a second; after a failed write (a full disk) the next event starts on a
fresh line rather than being glued to the cut one.

The file is opened without blocking and without following a symbolic link, and must
be a regular file (see :func:`open_log_file`): a FIFO, a device or a symlink planted
in a shared log directory is refused, never waited on or written through.
Nothing happens on import but registering the fork handler.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import socket
import stat
import sys
import threading
import time
import weakref
from typing import IO, Any, Final, final

import structlog

from kernel_fallback import _config
from kernel_fallback._filekind import describe
from kernel_fallback.exceptions import LogFileError

__all__ = [
    "INVALID_RANK",
    "LOGGER_NAME",
    "add_process_info",
    "env_logger",
    "expand_log_path",
    "open_log_file",
    "process_instance",
    "stdlib_logger",
]

#: The standard library logger that events go to when nothing else is configured.
LOGGER_NAME: Final = "kernel_fallback"

_writers: weakref.WeakSet[_LineWriter] = weakref.WeakSet()
#: Seconds between checks that a log file's path still names the open file (rotation).
REOPEN_CHECK_S: Final = 1.0
#: (pid, id) of this process's random instance id (see add_process_info).
_instance: tuple[int, str] | None = None
#: (config snapshot version, writer, logger) of the logger built from the environment.
_from_env: tuple[int, _LineWriter, Any] | None = None
#: (config snapshot version, error) when the environment's log file could not be opened.
_env_failed: tuple[int, OSError] | None = None
_env_lock = threading.Lock()
_hostname: str | None = None
_stdlib_bound: Any = None


#: What ``{rank}`` becomes when ``RANK`` (or ``LOCAL_RANK``) is set but not a rank.
INVALID_RANK: Final = "unknown"
_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _rank_for_path() -> str:
    """``RANK``, else ``LOCAL_RANK``, else ``0``; ``unknown`` for a set value that is not
    a plain non-negative integer in ASCII digits (``RANK=../../x`` or ``RANK=²``)."""
    for variable in ("RANK", "LOCAL_RANK"):
        raw = _config.env_value(os.environ.get(variable))
        if raw is not None:
            value = raw.strip()
            return value if value.isascii() and value.isdigit() else INVALID_RANK
    return "0"


def _host_for_path() -> str:
    """The host name, with every character but ``A-Z a-z 0-9 . _ -`` as ``_`` and a
    leading ``_`` added before a ``.``: never a separator, ``~``, ``.`` or ``..``."""
    host = _UNSAFE_IN_NAME.sub("_", socket.gethostname())
    return host if host and not host.startswith(".") else "_" + host


def expand_log_path(template: str) -> str:
    """``template`` with ``~``, ``{pid}``, ``{rank}`` and ``{host}`` replaced for this process.

    The values are made safe as parts of a file name, so the expanded path is always
    in the directory the template names: ``{pid}`` is digits, ``{rank}`` digits or
    ``unknown`` (see ``INVALID_RANK``), ``{host}`` the host name with anything but
    letters, digits, ``.``, ``_`` and ``-`` replaced, never starting with ``.``.
    """
    # `~` first: a value must not be read as a home directory.
    path = os.path.expanduser(template)
    values = {"pid": str(os.getpid()), "rank": _rank_for_path(), "host": _host_for_path()}
    for name, value in values.items():
        path = path.replace(f"{{{name}}}", value)
    return path


_ALLOWED = "a log file must be a regular file, or a name that does not exist yet (it is created)"
_OPEN_FLAGS: Final = (
    os.O_WRONLY
    | os.O_APPEND
    | os.O_CREAT
    # Never wait: opening a FIFO for writing blocks until a reader comes.
    | os.O_NONBLOCK
    # A symlink planted in a shared directory must not redirect (or create) anything.
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOCTTY", 0)
)


def open_log_file(path: str, origin: str) -> int:
    """Open ``path`` for appending and return the descriptor; only a regular file will do.

    Opened with ``O_NONBLOCK`` (a FIFO with no reader never blocks), ``O_NOFOLLOW`` (a
    symbolic link as the last component is refused, a dangling one creates nothing)
    and ``O_CLOEXEC``; then ``fstat`` must show a regular file, and ``O_NONBLOCK`` is
    cleared. Raises :class:`~kernel_fallback.exceptions.LogFileError` naming
    ``origin`` (the argument or variable that gave the path), the path, what it is
    and what is allowed.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o644)
    except OSError as exc:
        try:
            mode = os.lstat(path).st_mode
            reason = "" if stat.S_ISREG(mode) else describe(mode)
        except OSError:
            reason = ""
        if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EISDIR) and reason:
            message = f"{origin}: {path!r} is {reason}; {_ALLOWED}."
        else:  # not about what the file is: permissions, a full disk, a bad directory...
            reason = exc.strerror or str(exc)
            message = f"{origin}: cannot open {path!r} for appending: {reason}."
        raise LogFileError(message, path=path, reason=reason) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            reason = describe(mode)
            raise LogFileError(f"{origin}: {path!r} is {reason}; {_ALLOWED}.", path=path, reason=reason)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@final
class _LineWriter:
    """A structlog logger that appends each rendered event as one line.

    To a path: one ``os.write`` per line on an ``O_APPEND`` descriptor, so lines of
    processes sharing the file never interleave; the file is reopened (and the name
    expanded again) in a forked child, and when the path no longer names the open
    file (rotated: renamed or deleted; looked up at most once per
    :data:`REOPEN_CHECK_S`). To a stream: ``write`` then ``flush``; with no stream,
    whatever ``sys.stderr`` is at the time of the write. After a write that failed
    (a full disk may have cut the line short), the next one starts with a newline,
    so the cut line costs only itself.
    """

    def __init__(self, template: str | None, stream: IO[str] | None, origin: str = "") -> None:
        self.template = template
        self.stream = stream
        #: The argument or variable the template came from, for errors.
        self.origin = origin or f"log file {template!r}"
        self.path: str | None = None
        self._fd = -1
        self._pid = 0
        #: (st_dev, st_ino) of the open file, and when the path was last checked to name it.
        self._identity = (0, 0)
        self._checked = 0.0
        #: A write failed part-way: the next one starts on a fresh line.
        self._cut = False
        self._lock = threading.Lock()
        if template is not None:
            self._open(template)  # fail now, naming the file, rather than at the first event
        _writers.add(self)

    def _open(self, template: str) -> int:
        path = expand_log_path(template)
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        fd = open_log_file(path, self.origin)
        if self._fd >= 0:
            os.close(self._fd)  # in a forked child this closes only the child's copy
        self._fd, self._pid, self.path = fd, os.getpid(), path
        info = os.fstat(fd)
        self._identity, self._checked = (info.st_dev, info.st_ino), time.monotonic()
        return fd

    def _current_fd(self, template: str) -> int:
        """The descriptor to write to: reopened in a forked child, and after rotation.

        At most once per :data:`REOPEN_CHECK_S` the path is looked up again: when it no
        longer names the open file (renamed or deleted by a log rotation), the path is
        opened anew, so the events that follow go where the name says.
        """
        if self._pid != os.getpid():
            return self._open(template)
        now = time.monotonic()
        if now - self._checked >= REOPEN_CHECK_S and self.path is not None:
            self._checked = now
            try:
                info = os.lstat(self.path)
                moved = (info.st_dev, info.st_ino) != self._identity
            except FileNotFoundError:
                moved = True
            if moved:
                return self._open(template)
        return self._fd

    def msg(self, message: str) -> None:
        """Write ``message`` and a newline (after a newline when the last write failed)."""
        template = self.template
        if template is None:
            stream = self.stream if self.stream is not None else sys.stderr
            text = "\n" + message + "\n" if self._cut else message + "\n"
            self._cut = True  # until the write is known to be whole
            stream.write(text)
            stream.flush()
            self._cut = False
            return
        data = (message + "\n").encode("utf-8", "backslashreplace")
        with self._lock:
            fd = self._current_fd(template)
            if self._cut:
                # The last write stopped part-way (a full disk): without a newline this
                # event would be glued to the cut line, and both lost to the reader.
                data = b"\n" + data
            self._cut = True
            while data:
                data = data[os.write(fd, data) :]
            self._cut = False

    debug = info = warning = warn = error = err = critical = fatal = exception = failure = log = msg

    def close(self) -> None:
        """Close the file, if any; a later write reopens it."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd, self._pid = -1, 0

    def _after_fork(self) -> None:
        # A thread of the parent may have held the lock at fork time.
        self._lock = threading.Lock()


def _reinit_writers_after_fork() -> None:
    global _env_lock, _instance
    _env_lock = threading.Lock()
    _instance = None
    for writer in list(_writers):
        writer._after_fork()


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_reinit_writers_after_fork)


def process_instance() -> str:
    """A random id of this process (16 hex digits), new in each process and forked child.

    Unlike host and pid, it tells apart ranks in separate PID namespaces (containers)
    that share one host name, where each may well be pid 1.
    """
    global _instance
    pid = os.getpid()
    current = _instance
    if current is None or current[0] != pid:
        current = _instance = (pid, secrets.token_hex(8))
    return current[1]


def add_process_info(
    _logger: Any, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """structlog processor: add ``pid``, ``host``, ``instance`` and, when set, ``rank`` and ``local_rank``.

    Enough to tell the processes of a multi-process job apart once their logs are
    merged: ``instance`` is a random id per process (:func:`process_instance`), which
    the reader keys on. ``rank`` is ``RANK`` and ``local_rank`` is ``LOCAL_RANK``, as
    torchrun sets them.
    """
    global _hostname
    if _hostname is None:
        _hostname = socket.gethostname()
    event_dict.setdefault("pid", os.getpid())
    event_dict.setdefault("host", _hostname)
    event_dict.setdefault("instance", process_instance())
    for variable, key in (("RANK", "rank"), ("LOCAL_RANK", "local_rank")):
        value = _config.env_value(os.environ.get(variable))
        if value:
            # "²".isdigit() is true but int() refuses it (and very long digit strings): that lost every event.
            plain = value.isascii() and value.strip().isdigit() and len(value) < 19
            event_dict.setdefault(key, int(value) if plain else value)
    return event_dict


def _lead_with_time_and_event(
    _logger: Any, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Put ``timestamp``, ``level`` and ``event`` first, so a JSON line reads like a log line."""
    head = {k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    return {**head, **event_dict}


def _build(format: str, writer: _LineWriter, level: int) -> Any:
    """A structlog logger of our own processors around ``writer``; nothing global changes."""
    renderer: structlog.typing.Processor
    if format == "json":
        # repr: a field that is not JSON (a dtype, a tuple key) must not lose the event.
        renderer = structlog.processors.JSONRenderer(default=repr)
    else:
        # Colours only for a terminal; a file gets plain text.
        target: object = writer.stream
        if target is None and writer.template is None:
            target = sys.stderr
        isatty = getattr(target, "isatty", None)
        renderer = structlog.dev.ConsoleRenderer(colors=bool(callable(isatty) and isatty()))
    return structlog.wrap_logger(
        writer,
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_process_info,
            _lead_with_time_and_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )


def _render_for_stdlib(
    _logger: Any, _method: str, event_dict: structlog.typing.EventDict
) -> tuple[tuple[str], dict[str, Any]]:
    rendered = _KV(_logger, _method, dict(event_dict))
    return (str(rendered),), {"extra": {"kernel_fallback": dict(event_dict)}}


_KV = structlog.processors.KeyValueRenderer(
    key_order=["event", "kernel", "kwarg", "policy"], drop_missing=True
)


def stdlib_logger() -> Any:
    """structlog around the standard library logger :data:`LOGGER_NAME` (built once).

    The host's ``logging`` set-up decides what is shown; each record carries the event's
    fields in ``extra["kernel_fallback"]``.
    """
    global _stdlib_bound
    if _stdlib_bound is None:
        _stdlib_bound = structlog.wrap_logger(
            logging.getLogger(LOGGER_NAME),
            processors=[
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                add_process_info,
                _render_for_stdlib,
            ],
            wrapper_class=structlog.stdlib.BoundLogger,
        )
    return _stdlib_bound


def env_logger(snap: _config.Snapshot) -> Any:
    """The logger ``KERNEL_FALLBACK_LOG_FORMAT``/``_LOG_FILE`` describe in ``snap``.

    Built once per configuration snapshot (``reload_config()`` makes a new one); the
    writer of the previous one is closed. When the file cannot be used, the error is
    kept for the snapshot and raised again at each event without touching the file
    system: ``_events.emit`` reports the first on standard error and counts them
    (``_events.log_errors()``); the kernel call goes on.
    """
    global _from_env, _env_failed
    current = _from_env
    if current is not None and current[0] == snap.version:
        return current[2]
    with _env_lock:
        if _from_env is not None and _from_env[0] == snap.version:  # another thread built it
            return _from_env[2]
        failed = _env_failed
        if failed is not None and failed[0] == snap.version:
            # A fresh traceback each time: re-raising one object would grow its traceback.
            raise failed[1].with_traceback(None)
        origin = f"{_config.ENV_LOG_FILE}={snap.log_file!r}"
        try:
            writer = _LineWriter(snap.log_file, None, origin)
        except OSError as exc:
            _env_failed = (snap.version, exc)
            raise
        logger = _build(snap.log_format or "json", writer, logging.WARNING)
        old, _from_env = _from_env, (snap.version, writer, logger)
    if old is not None:
        old[1].close()
    return logger
