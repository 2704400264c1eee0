"""The log reader on hostile and damaged input, through the real command in real processes.

Whatever a log holds, ``report`` and ``check`` answer 0, 1 or 2 with one line on
stderr, never a traceback; damaged lines are counted and skipped; memory stays flat
however long a file or a line is.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from child_env import clean_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_fallback._cli import main
from kernel_fallback._loglines import MAX_LINE_BYTES

WORKLOAD = Path(__file__).with_name("fallback_workload.py")
BOM = b"\xef\xbb\xbf"


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """The real command, ``python -m kernel_fallback ARGS``, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "kernel_fallback", *args],
        input=stdin.decode("utf-8", "surrogateescape") if stdin is not None else None,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def event(**fields: Any) -> str:
    base = {"event": "kernel_fallback.summary", "kernel": "k", "kwarg": "out", "policy": "warn", "count": 3}
    return json.dumps({**base, **fields})


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


VALID = event().encode()


@pytest.mark.parametrize(
    ("lines", "code", "expected"),
    [
        (
            [VALID, b'{"event": "kernel_fallback.summary", "x": ' + b"[" * 100_000],
            1,
            "1 malformed line(s) skipped, first at {path}:2",
        ),
        ([VALID, event(x=json.loads(deep(900))).encode()], 1, "k       kwarg  out"),
        (
            [event(rank=[1]).encode()],
            2,
            "{path}:1: kernel_fallback.summary event: 'rank' must be a string or an integer, got [1].",
        ),
        ([event(local_rank={"a": 1}).encode()], 2, "'local_rank' must be a string or an integer"),
        ([event(pid=[deep(5)]).encode()], 2, "'pid' must be a string or an integer"),
        (
            [event(epoch=json.loads(deep(900))).encode()],
            2,
            "'epoch' must be a non-negative integer, got [[[[...]]]].",
        ),
        ([event(kernel="k" * 10_000 + "\udc80").encode("utf-8", "surrogatepass")], 1, "k" * 200),
        ([event(kernel="k\ud800").encode()], 1, "k\\ud800  kwarg"),
        ([event(kernel="kX").encode().replace(b"kX", b"k\xff")], 1, "--allow 'k\ufffd:out'"),
        (
            [event(timestamp="0001-01-01T00:00:00+01:00", first_seen="9999-12-31T23:59:59-01:00").encode()],
            1,
            "k  ",
        ),
        ([VALID, event(count=0).encode().replace(b": 0", b": " + b"9" * 5000)], 1, "1 malformed line(s)"),
        ([VALID, b'{"event": "kernel_fallback.' + b"x" * (3 * MAX_LINE_BYTES) + b'"}'], 1, "over 1 MiB"),
        ([b"\x00" * 100, b"\xff\xfe" * 50, b"{" * 10, VALID], 1, "1 fallback(s) not allowed"),
        ([BOM + VALID, BOM + event(kernel="k2").encode()], 1, "2 fallback(s) not allowed"),
    ],
    ids=[
        "deep-nesting",
        "nesting-within-limits",
        "rank-list",
        "local-rank-dict",
        "pid-list",
        "epoch-deep-list",
        "long-kernel-and-surrogate-escape",
        "lone-surrogate",
        "invalid-utf8",
        "time-out-of-range",
        "huge-integer",
        "line-over-limit",
        "binary-junk",
        "bom-at-start-and-after-cat",
    ],
)
def test_hostile_lines_get_an_exit_status_never_a_traceback(
    tmp_path: Path, lines: list[bytes], code: int, expected: str
) -> None:
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    done = cli("check", str(path))
    assert "Traceback" not in done.stderr
    assert done.returncode == code, done.stderr
    assert expected.format(path=path) in done.stdout + done.stderr
    assert len(done.stderr.splitlines()) <= 2  # the verdict, and at most one note
    if code == 2:
        assert done.stderr.startswith("kernel-fallback: error: ")
    report = cli("report", "--format", "json", str(path))
    assert report.returncode == (2 if code == 2 else 0), report.stderr
    assert "Traceback" not in report.stderr
    if code != 2:
        json.loads(report.stdout)  # ASCII JSON: loads whatever the log held


@pytest.mark.parametrize(
    ("long_line", "ignored", "malformed"),
    [
        (b"INFO " + b"x" * (2 * MAX_LINE_BYTES), 1, 0),
        (b'{"event": "kernel_fallback.summary", "reason": "' + b"x" * (2 * MAX_LINE_BYTES) + b'"}', 0, 1),
        (b"x" * (2 * MAX_LINE_BYTES) + b"kernel_fallback.summary", 1, 0),
    ],
    ids=["someone-elses", "ours", "marker-past-the-first-mib"],
)
def test_an_over_long_line_is_skipped_and_counted_by_whose_it_looks(
    tmp_path: Path, long_line: bytes, ignored: int, malformed: int
) -> None:
    path = tmp_path / "long.jsonl"
    path.write_bytes(VALID + b"\n" + long_line + b"\n" + VALID + b"\n")
    done = cli("report", "--format", "json", str(path))
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert (data["lines"], data["events"]) == (3, 2)
    assert (data["ignored_lines"], data["malformed_lines"]) == (ignored, malformed)


def run_workload(tmp_path: Path) -> Path:
    """The log of a real process that took fallbacks (toy_add:out, 4 summaries)."""
    log = tmp_path / "kf.jsonl"
    subprocess.run(
        [sys.executable, str(WORKLOAD), "--add", "4"],
        env=clean_env(KERNEL_FALLBACK_LOG_FORMAT="json", KERNEL_FALLBACK_LOG_FILE=str(log)),
        check=True,
        timeout=120,
    )
    return log


def test_a_line_cut_short_is_counted_and_skipped_not_fatal(tmp_path: Path) -> None:
    """A process killed while writing (or a full disk) leaves half a line at the end."""
    log = run_workload(tmp_path)
    whole = log.read_bytes()
    last = whole.splitlines()[-1]
    assert b'"kernel_fallback.summary"' in last
    log.write_bytes(whole + last[: len(last) // 2])  # a second process killed mid-write
    done = cli("check", str(log), "--allow", "toy_add:out")
    assert done.returncode == 0, done.stderr
    assert "ok: 1 fallback(s), all allowed" in done.stdout
    assert done.stderr.startswith(f"note: 1 malformed line(s) skipped, first at {log}:")
    data = json.loads(cli("report", "--format", "json", str(log)).stdout)
    assert (data["malformed_lines"], data["fallbacks"][0]["count"]) == (1, 4)
    # The same with the log gzipped, and read from standard input.
    gz = tmp_path / "kf.jsonl.gz"
    gz.write_bytes(gzip.compress(log.read_bytes()))
    for args, stdin in (([str(gz)], None), (["-"], gz.read_bytes())):
        got = subprocess.run(
            [sys.executable, "-m", "kernel_fallback", "report", "--format", "json", *args],
            input=stdin,
            env=clean_env(),
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["malformed_lines"] == 1


def test_a_bom_at_the_start_of_a_file_is_skipped(tmp_path: Path) -> None:
    log = run_workload(tmp_path)
    log.write_bytes(BOM + log.read_bytes())
    done = cli("check", str(log), "--allow", "toy_add:out")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    data = json.loads(cli("report", "--format", "json", str(log)).stdout)
    assert (data["ignored_lines"], data["malformed_lines"], data["fallbacks"][0]["count"]) == (0, 0, 4)


@pytest.mark.parametrize(
    "content",
    [b"", b"\n\n", b"INFO started\nINFO done\n", b'{"event": "kernel_fallback.summary", "ker'],
    ids=["empty-file", "blank-lines", "other-programs-lines", "only-a-cut-line"],
)
def test_check_of_logs_without_events_needs_allow_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "quiet.jsonl"
    path.write_bytes(content)
    refused = cli("check", str(path))
    assert refused.returncode == 2
    assert refused.stderr.startswith("kernel-fallback: error: no kernel_fallback event in 1 file(s)")
    assert "--allow-empty" in refused.stderr
    assert refused.stdout == ""
    accepted = cli("check", "--allow-empty", str(path))
    assert accepted.returncode == 0, accepted.stderr
    assert "ok: no fallbacks (0 event(s) in 1 file(s))" in accepted.stdout


def peak_rss_mb(*args: str) -> float:
    """Peak resident memory (MB) of ``python -m kernel_fallback ARGS``, read from wait4."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel_fallback", *args],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, args
    return usage.ru_maxrss / 1024  # KiB on Linux


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units differ")
def test_memory_does_not_grow_with_the_size_of_a_log_or_of_a_line(tmp_path: Path) -> None:
    small = tmp_path / "small.jsonl"
    small.write_bytes(VALID + b"\n")
    many_lines = tmp_path / "many.jsonl"
    one_line = tmp_path / "one-line.jsonl"
    with many_lines.open("wb") as f:
        for pid in range(100_000):  # 30 MB of events of 10 processes
            f.write(event(pid=pid % 10, reason="r" * 200).encode() + b"\n")
    # A 30 MB line (no newline, as a runaway writer leaves it) naming our events.
    one_line.write_bytes(VALID + b'\n{"event": "kernel_fallback.summary", "x": "' + b"y" * 30_000_000)
    assert many_lines.stat().st_size > 25_000_000
    base = peak_rss_mb("report", str(small))
    for path in (many_lines, one_line):
        grown = peak_rss_mb("report", str(path)) - base
        assert grown < 10, f"{path.name}: peak RSS grew by {grown:.1f} MB for a 30 MB file"


# --- fuzzing: in-process, many inputs ---------------------------------------------------

_FIELDS = [
    "event", "kernel", "kwarg", "provider", "chosen", "subject", "policy", "kind", "count", "level",
    "pid", "host", "rank", "local_rank", "epoch", "timestamp", "first_seen", "where", "reason",
    "source", "compiled_traces", "graph_captures",
]  # fmt: skip
_EVENTS = ["kernel_fallback.summary", "kernel_fallback.kwarg_dropped", "kernel_fallback.stats_overflow"]
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(_EVENTS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_objects = st.fixed_dictionaries(
    {"event": st.sampled_from(_EVENTS) | _values},
    optional={name: _values for name in _FIELDS[1:]} | {"kernel_fallback": _values},
)


@st.composite
def _lines(draw: st.DrawFn) -> bytes:
    text = json.dumps(draw(_objects), ensure_ascii=draw(st.booleans()))
    data = text.encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["whole", "cut", "bom", "junk"]))
    if how == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "bom":
        data = BOM + data
    elif how == "junk":
        data = draw(st.binary(max_size=40)) + b"kernel_fallback." + draw(st.binary(max_size=40))
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_lines(), min_size=1, max_size=6))
def test_fuzz_any_lines_give_0_1_or_2_with_one_line_never_an_internal_error(lines: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "fuzz.jsonl")
        path.write_bytes(b"\n".join(lines))
        for argv in (
            ["report", str(path)],
            ["check", "--allow-empty", str(path)],
            ["report", "--format", "json", str(path)],
        ):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
            assert code in (0, 1, 2)
            # The guard that turns a bug into exit 2 must not be what answered.
            assert "internal error" not in err.getvalue(), err.getvalue()
            if code == 2:
                assert err.getvalue().startswith("kernel-fallback: error: ")
                assert len(err.getvalue().splitlines()) == 1
            elif argv[1] == "--format":
                json.loads(out.getvalue())
