"""``configure_logging()``: JSON-lines or console event logs for applications without logging.

Only kernel_fallback's own events are affected: the logger is installed with
``_events.set_logger()`` and built with ``structlog.wrap_logger`` and its own
processors, so neither structlog's global configuration nor the ``logging`` tree is
touched. Nothing happens on import.

Two ways in:
- ``configure_logging(format=..., file=..., level=...)`` from code;
- ``KERNEL_FALLBACK_LOG_FORMAT=json|console`` and ``KERNEL_FALLBACK_LOG_FILE=path``,
  read by ``configure_logging()`` for the arguments it is not given, and applied by
  themselves at the first event of a process that installed no logger (so a launcher
  can turn logs on for every rank without touching code). That second way does not
  go through this module: :mod:`kernel_fallback._events` calls
  :func:`kernel_fallback._sinks.env_logger` itself.

Layering is one way: this module imports :mod:`kernel_fallback._sinks` (files,
writers, the processor chain; see there for how lines are written and which files
are refused) and :mod:`kernel_fallback._events` (where the logger is installed);
neither imports it back.
"""

from __future__ import annotations

import io
import logging
import os
from typing import IO, Final

from kernel_fallback import _config, _events, _sinks
from kernel_fallback.exceptions import PolicyConfigError

__all__ = ["LOG_LEVELS", "configure_logging"]

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")

#: The writer of the logger configure_logging() installed, closed when replaced.
_configured: _sinks._LineWriter | None = None


#: The level numbers structlog's filtering loggers know, lowest first.
_STANDARD_LEVELS: Final = (
    logging.NOTSET,
    logging.DEBUG,
    logging.INFO,
    logging.WARNING,
    logging.ERROR,
    logging.CRITICAL,
)


def _check_level(level: object) -> int:
    """The threshold for ``level``: a name, or a number from 0 to 50 rounded up to a named level.

    Events are only ever logged at the named levels, so a threshold of 25 lets through
    exactly what 30 (warning) does.
    """
    if isinstance(level, str) and level.strip().lower() in LOG_LEVELS:
        return int(logging.getLevelName(level.strip().upper()))
    if isinstance(level, int) and not isinstance(level, bool) and 0 <= level <= logging.CRITICAL:
        return next(standard for standard in _STANDARD_LEVELS if standard >= level)
    raise PolicyConfigError(
        f"configure_logging(level={level!r}): use one of {', '.join(LOG_LEVELS)} or a logging level "
        f"number from 0 to {logging.CRITICAL}."
        + (_config.did_you_mean(level.lower(), LOG_LEVELS) if isinstance(level, str) else ""),
        name="level",
        value=level,
        allowed=LOG_LEVELS,
    )


def _check_stream(file: object) -> IO[str]:
    """``file`` if it is an open text stream that can be written; else a clear TypeError/ValueError.

    A binary stream would fail at the first event (``str`` written to bytes), a
    read-only or closed one too: refused here, before anything is set up.
    """
    if isinstance(file, (io.RawIOBase, io.BufferedIOBase)) or "b" in str(getattr(file, "mode", "")):
        raise TypeError(
            f"configure_logging(file={file!r}): a binary stream; events are text: use a path, "
            "a stream opened in text mode ('a' or 'w', not 'ab'), or None."
        )
    writable = getattr(file, "writable", None)
    if callable(writable):
        try:
            ok = writable()
        except ValueError as exc:  # I/O operation on closed file
            raise ValueError(f"configure_logging(file={file!r}): the stream is closed.") from exc
        if not ok:
            raise ValueError(
                f"configure_logging(file={file!r}): the stream is not writable (opened for reading?); "
                "use a stream opened with 'a' or 'w', a path, or None."
            )
    return file  # type: ignore[return-value]


def configure_logging(
    format: str | None = None,
    file: str | os.PathLike[str] | IO[str] | None = None,
    level: str | int = "warning",
) -> None:
    """Send kernel_fallback's events to a JSON-lines or console log, for this process.

    ``format`` is ``"json"`` (one JSON object per line, what ``kernel-fallback
    report`` reads) or ``"console"`` (for people); unset, ``KERNEL_FALLBACK_LOG_FORMAT``,
    else ``"json"``. ``file`` is a path (``{pid}``, ``{rank}`` and ``{host}`` are
    expanded; directories are created; lines are appended) or an open, writable text
    stream (a binary, read-only or closed one is refused); unset,
    ``KERNEL_FALLBACK_LOG_FILE``, else standard error. ``level`` filters events (they
    are logged at ``warning``): a name, or a ``logging`` level number from 0 to 50
    (one between two named levels acts as the next named level up). Each event carries
    ``timestamp`` (ISO 8601, UTC), ``level``, ``pid``, ``host``, ``instance`` (a random
    id of the process) and ``rank``/``local_rank`` when set.

    Affects only kernel_fallback's events; calling again replaces the previous set-up,
    and ``kernel_fallback._events.set_logger(None)`` goes back to the default routing.
    Raises :class:`~kernel_fallback.PolicyConfigError` for an invalid argument or
    variable, ``TypeError``/``ValueError`` for a stream that cannot take text,
    :class:`~kernel_fallback.exceptions.LogFileError` (an ``OSError``) when
    the file is not a regular file (a FIFO, a device, a directory, a symbolic link)
    or cannot be opened, and ``OSError`` when its directory cannot be created.
    """
    global _configured
    if format is None:
        raw = _config.env_value(os.environ.get(_config.ENV_LOG_FORMAT))
        format = _config.parse_log_format(_config.ENV_LOG_FORMAT, raw) if raw else "json"
    elif isinstance(format, str):
        format = _config.parse_log_format("format", format)
    else:
        raise PolicyConfigError(
            f"configure_logging(format={format!r}): use one of {', '.join(_config.LOG_FORMATS)}.",
            name="format",
            value=format,
            allowed=_config.LOG_FORMATS,
        )
    threshold = _check_level(level)
    template: str | None = None
    stream: IO[str] | None = None
    origin = ""
    if file is None:
        raw = _config.env_value(os.environ.get(_config.ENV_LOG_FILE))
        template = _config.check_log_file(_config.ENV_LOG_FILE, raw) if raw else None
        origin = f"{_config.ENV_LOG_FILE}={raw!r}"
    elif isinstance(file, (str, os.PathLike)):
        template = _config.check_log_file("file", os.fspath(file))
        origin = f"configure_logging(file={template!r})"
    elif callable(getattr(file, "write", None)):
        stream = _check_stream(file)
    else:
        raise TypeError(f"configure_logging(file={file!r}): use a path, an open text stream or None.")
    writer = _sinks._LineWriter(template, stream, origin)
    old, _configured = _configured, writer
    _events.set_logger(_sinks._build(format, writer, threshold))
    if old is not None:
        old.close()
