"""The ``kernel-fallback`` command (also ``python -m kernel_fallback``).

- ``report FILES...``: merge JSON-lines logs of many processes into one table of
  fallbacks with counts, processes and first seen (``--format json`` for data);
- ``check FILES... [--allow kernel:kwarg ...] [--allow-empty]``: exit 1 when the logs
  show a fallback that is not allowed (also ``KERNEL_FALLBACK_ALLOW``), for CI;
- ``config [--import MODULE ...]``: validate every ``KERNEL_FALLBACK_*`` variable and
  every variable a declared kernel or chain reads, and print the effective settings.

Exit status: 0 fine; 1 a finding (a fallback not allowed, an invalid variable); 2 a
usage error, input that cannot be read (a missing file, damaged gzip, a mistyped event
field, no events at all for ``check``, a log that is not a regular file, a gzip
bomb). Output that cannot be written whole (``| head``, a full disk, ``2>/dev/full``)
is never a pass: 1 when the answer was a finding, else 2. Nothing else: whatever the logs hold, the
answer is one of these, with one line on standard error, never a traceback. Text
output escapes control and other non-printable characters, so a log line cannot move
the cursor, rewrite a line or colour the terminal. ``report`` and ``check`` import
neither torch nor structlog: they start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import TextIO

from kernel_fallback import _config
from kernel_fallback._allow import AllowList, allow_pattern
from kernel_fallback._loglines import MAX_LINE_BYTES
from kernel_fallback._logread import FallbackRow, LogInputError, LogReport, read_logs
from kernel_fallback._textsafe import safe, safe_lines
from kernel_fallback.exceptions import PolicyConfigError

__all__ = ["main"]

PROG = "kernel-fallback"
EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command line or its inputs: one line on stderr, exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read kernel_fallback event logs, gate CI on them, and check its configuration.",
        epilog="Exit status: 0 ok, 1 a fallback not allowed or an invalid variable, "
        "2 a usage or input error.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = sub.add_parser("report", help="merge JSON-lines logs into a table of fallbacks")
    report.add_argument("files", nargs="+", metavar="FILE", help="log files (.gz too; - for stdin)")
    report.add_argument("--format", choices=("table", "json"), default="table", help="output format")

    check = sub.add_parser("check", help="exit 1 when the logs show a fallback that is not allowed")
    check.add_argument("files", nargs="+", metavar="FILE", help="log files (.gz too; - for stdin)")
    check.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="KERNEL:KWARG",
        help="an accepted fallback (fnmatch patterns, e.g. 'my_kernel:out', 'my_kernel:*'); "
        f"repeat or separate with commas; {_config.ENV_ALLOW} is added",
    )
    check.add_argument(
        "--allow-empty",
        action="store_true",
        help="pass when the files hold no kernel_fallback event at all (a run without fallbacks "
        "logs none); without it that is an error, since the wrong files may have been read",
    )
    check.add_argument("--format", choices=("table", "json"), default="table", help="output format")

    config = sub.add_parser(
        "config", help="validate KERNEL_FALLBACK_* variables, show the effective policies"
    )
    config.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first, so the kernels it declares are shown and their variables checked",
    )
    config.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    What the command prints is gathered first and written at the end, so that a failed
    write (``| head`` closing the pipe, a full disk, ``2>/dev/full``) is known before the
    exit status is chosen: a cut output is never a pass. It is exit 1 when the answer was
    a finding (the finding stands), else 2; an internal error discards the output
    gathered so far, so standard output never holds half a JSON document.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _guarded(argv, out)
    return _deliver(code, out.getvalue(), err.getvalue())


def _guarded(argv: Sequence[str] | None, out: io.StringIO) -> int:
    try:
        return _run(argv)
    except (UsageError, LogInputError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the exit status is a contract: 1 means a finding
        # Every known cause is handled where it arises; this is the last line of defence
        # so that a bug of ours is never read by CI as "a fallback not allowed".
        out.seek(0)
        out.truncate()  # whatever was printed before is not to be trusted, nor half a document
        _error(f"internal error: {type(exc).__name__}: {exc} (please report it)")
        return EXIT_USAGE


def _deliver(code: int, out: str, err: str) -> int:
    """Write what the command printed; a failed write makes ``code`` a failure (1 or 2)."""
    failed: list[str] = []
    for text, stream, name in ((out, sys.stdout, "standard output"), (err, sys.stderr, "standard error")):
        if stream is None:  # pythonw, or closed by the caller
            if text:
                failed.append(f"{name} (there is none)")
            continue
        try:
            _write_all(stream, text)
        except (OSError, ValueError) as exc:  # ValueError: a closed stream
            failed.append(f"{name} ({getattr(exc, 'strerror', None) or exc})")
            _silence(stream)
    if not failed:
        return code
    code = EXIT_FINDING if code == EXIT_FINDING else EXIT_USAGE
    with contextlib.suppress(OSError, ValueError, AttributeError):
        # Standard error may be the stream that failed: then nothing can be told.
        print(
            f"{PROG}: error: could not write to {' and '.join(failed)}: the output is incomplete, "
            f"exit status {code}.",
            file=sys.stderr,
            flush=True,
        )
    return code


def _write_all(stream: TextIO, text: str) -> None:
    """Write ``text`` whole or raise: a short write is not taken for a complete one.

    Through the byte buffer when there is one: with ``PYTHONUNBUFFERED`` that is the raw
    file, whose ``write`` may take only part of the data (a pipe whose reader left),
    which ``TextIOWrapper.write`` would drop without a word.
    """
    buffer = getattr(stream, "buffer", None)
    if buffer is None or not text:
        stream.write(text)
        stream.flush()
        return
    stream.flush()
    # A character the terminal's encoding lacks is escaped, not a UnicodeEncodeError.
    data = memoryview(text.encode(stream.encoding or "utf-8", "backslashreplace"))
    while data:
        written = buffer.write(data)
        if not written:  # None: a non-blocking stream that would block; 0: nothing moves
            raise OSError(errno.EAGAIN, "the stream takes no more data")
        data = data[written:]
    buffer.flush()


def _silence(stream: TextIO) -> None:
    """Point a stream that failed at devnull, so the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on bad arguments (2)
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    if args.command == "report":
        return _report(args, sys.stdout)
    if args.command == "check":
        return _check(args, sys.stdout)
    from kernel_fallback._cli_config import show_config  # imports torch: only for `config`

    try:
        return show_config(args.imports, args.format, sys.stdout)
    except ImportError as exc:
        raise UsageError(str(exc)) from exc


def _error(message: str) -> None:
    print(f"{PROG}: error: {safe(message)}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"note: {safe(message)}", file=sys.stderr)


# --- report and check -------------------------------------------------------------


def _count(row: FallbackRow) -> str:
    return str(row.count) if row.exact else f">={row.count}"


def _table(rows: Sequence[FallbackRow], out: TextIO) -> None:
    header = ("KERNEL", "KIND", "KWARG/PROVIDER", "POLICY", "COUNT", "PROCS", "FIRST SEEN (UTC)", "WHERE")
    # Every cell comes from a log line: escaped, so that it cannot end a row early or
    # send escape sequences to the terminal.
    cells = [
        tuple(
            safe(c)
            for c in (
                r.kernel,
                r.kind,
                r.subject,
                r.policy,
                _count(r),
                str(r.processes),
                r.first_seen[:19].replace("T", " "),
                r.where,
            )
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    for line in (header, *cells):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), file=out)


def _footer(report: LogReport, out: TextIO) -> None:
    safe_lines(
        f"{len(report.files)} file(s), {report.lines} line(s): {report.events} kernel_fallback event(s) "
        f"from {report.processes} process(es); {report.ignored} line(s) ignored "
        "(not kernel_fallback JSON events).",
        out,
    )
    if any(not r.exact for r in report.rows):
        print(
            ">=N: some processes logged a first occurrence but no summary (killed, or exited "
            "before flush()); N is a lower bound.",
            file=out,
        )


def _notes(report: LogReport) -> None:
    """What a reader of the numbers must know, on stderr: lines skipped or not understood."""
    if report.malformed:
        _note(
            f"{report.malformed} malformed line(s) skipped, first at {report.first_malformed}: they "
            "name a kernel_fallback event but are not valid JSON (cut short by a killed process or "
            f"a full disk, damaged, nested too deep, or over {MAX_LINE_BYTES >> 20} MiB)."
        )
    # Lines but no events of ours: console-format logs would pass a gate vacuously.
    if report.events == 0 and report.ignored:
        _note(
            f"no kernel_fallback JSON events found; were the logs written with {_config.ENV_LOG_FORMAT}=json?"
        )


def _report(args: argparse.Namespace, out: TextIO) -> int:
    report = read_logs(args.files)
    if args.format == "json":
        json.dump(report.as_dict(), out, indent=2)  # ASCII only: control characters escaped
        print(file=out)
    else:
        if report.rows:
            _table(report.rows, out)
        else:
            print("No fallbacks.", file=out)
        _footer(report, out)
    _notes(report)
    return EXIT_OK


def _allow_list(specs: Sequence[str]) -> AllowList:
    try:
        return AllowList.parse("--allow", specs) + AllowList.from_env()
    except PolicyConfigError as exc:
        raise UsageError(str(exc)) from exc


def _check_readable(report: LogReport, allow_empty: bool) -> None:
    """Raise when the gate cannot trust what it read: it must not pass on fallbacks it missed."""
    if report.unreadable_ours:
        raise UsageError(
            f"{report.unreadable_ours} line(s) name kernel_fallback events but are not JSON; "
            f"write the logs with {_config.ENV_LOG_FORMAT}=json (or configure_logging(format='json'))."
        )
    if report.events == 0 and not allow_empty:
        skipped = (
            f", {report.malformed} malformed line(s) skipped (first at {report.first_malformed})"
            if report.malformed
            else ""
        )
        raise UsageError(
            f"no kernel_fallback event in {len(report.files)} file(s) ({report.lines} line(s){skipped}), "
            "so nothing was checked; were these the right files? A run without fallbacks logs no "
            "events: pass --allow-empty to accept that."
        )


def _check(args: argparse.Namespace, out: TextIO) -> int:
    allow = _allow_list(args.allow)
    report = read_logs(args.files)
    _check_readable(report, args.allow_empty)
    denied = [r for r in report.rows if not allow.allows(r.kernel, r.subject)]
    accepted = [r for r in report.rows if r not in denied]
    unused = [
        p for p in allow.patterns if not any(AllowList((p,)).allows(r.kernel, r.subject) for r in accepted)
    ]
    if args.format == "json":
        data = {
            "ok": not denied,
            "denied": [r.as_dict() for r in denied],
            "allowed": [r.as_dict() for r in accepted],
            "unused_allow": unused,
            **{k: v for k, v in report.as_dict().items() if k != "fallbacks"},
        }
        json.dump(data, out, indent=2)
        print(file=out)
    elif denied:
        print(f"{PROG} check: FAILED: {len(denied)} fallback(s) not allowed:", file=out)
        _table(denied, out)
        # Quoted for a POSIX shell, and escaped for the allow-list: taken back as printed.
        patterns = shlex.quote(",".join(sorted({allow_pattern(r.kernel, r.subject) for r in denied})))
        safe_lines(
            f"Fix them, or accept them with --allow {patterns} or {_config.ENV_ALLOW}={patterns}.", out
        )
    else:
        what = f"{len(accepted)} fallback(s), all allowed" if accepted else "no fallbacks"
        safe_lines(
            f"{PROG} check: ok: {what} ({report.events} event(s) in {len(report.files)} file(s)).", out
        )
    if unused and args.format != "json":
        _note(f"allowed but not seen (stale allow-list?): {', '.join(unused)}")
    _notes(report)
    return EXIT_FINDING if denied else EXIT_OK
