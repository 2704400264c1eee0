"""configure_logging(): formats, levels, arguments, the variables it reads, and summaries.

What the sinks themselves do (file safety, placeholders, writers, fork handling, the
logger the variables describe) is tested in test_sinks.py."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import kernel_fallback
from kernel_fallback import PolicyConfigError, _events, tolerant_kwargs
from kernel_fallback._logging import configure_logging

WORKLOAD = Path(__file__).with_name("fallback_workload.py")

pytestmark = pytest.mark.usefixtures("close_log_files")


@tolerant_kwargs(drop=["out"], name="log_add")
def log_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.add(x, y)


@tolerant_kwargs(drop={"num_splits": 1}, name="log_split")
def log_split(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def fall_back(times: int = 1) -> None:
    for _ in range(times):
        log_add(torch.ones(2), torch.ones(2), out=torch.empty(2))


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_event_carries_what_aggregation_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    out = io.StringIO()
    configure_logging(format="json", file=out)
    fall_back(3)
    (event,) = json_lines(out.getvalue())
    assert event["event"] == "kernel_fallback.kwarg_dropped"
    assert list(event)[:3] == ["timestamp", "level", "event"]
    stamp = datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - stamp) < datetime.timedelta(minutes=1)
    assert event["pid"] == os.getpid()
    assert event["host"] == socket.gethostname()
    assert "rank" not in event
    assert "local_rank" not in event
    assert (event["kernel"], event["kwarg"], event["policy"]) == ("log_add", "out", "warn")
    assert event["reason"] == "log_add does not accept 'out' (signature)"
    assert re.fullmatch(rf"{re.escape(__file__)}:\d+", event["where"])
    assert event["level"] == "warning"


def test_where_is_the_callers_line() -> None:
    out = io.StringIO()
    configure_logging(file=out)
    log_split(torch.ones(1), num_splits=4)
    line = sys._getframe().f_lineno - 1
    (event,) = json_lines(out.getvalue())
    assert event["where"] == f"{__file__}:{line}"


def test_console_format_is_one_readable_line() -> None:
    out = io.StringIO()
    configure_logging(format="console", file=out)
    fall_back()
    (line,) = out.getvalue().splitlines()
    assert "kernel_fallback.kwarg_dropped" in line
    assert "kernel=log_add" in line
    assert "kwarg=out" in line
    assert f"pid={os.getpid()}" in line
    assert "\x1b[" not in line  # no colour codes outside a terminal


def test_level_filters_events() -> None:
    out = io.StringIO()
    configure_logging(file=out, level="error")
    fall_back()
    assert out.getvalue() == ""
    configure_logging(file=out, level=logging.WARNING)
    kernel_fallback.reset_stats()
    fall_back()
    assert len(json_lines(out.getvalue())) == 1


@pytest.mark.parametrize(
    ("kwargs", "name", "message"),
    [
        ({"format": "jsn"}, "format", r"format='jsn'.*json, console.*Did you mean 'json'"),
        ({"level": "warnig"}, "level", r"level='warnig'.*debug, info, warning.*Did you mean 'warning'"),
        ({"level": True}, "level", r"level=True"),
        ({"file": "kf-{rnak}.jsonl"}, "file", r"\{rnak\} is not a placeholder.*Did you mean '\{rank\}'"),
        ({"file": ""}, "file", r"empty"),
        ({"file": "kf\0.jsonl"}, "file", r"NUL"),
    ],
    ids=["format", "level-name", "level-bool", "placeholder", "empty-file", "nul-in-file"],
)
def test_invalid_arguments_name_the_argument(kwargs: dict[str, Any], name: str, message: str) -> None:
    with pytest.raises(PolicyConfigError, match=message) as info:
        configure_logging(**kwargs)
    assert info.value.name == name


def test_a_file_argument_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"configure_logging\(file=42\)"):
        configure_logging(file=42)  # type: ignore[arg-type]


def test_an_unwritable_file_fails_at_configuration(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError, match="a-file"):
        configure_logging(file=tmp_path / "a-file" / "log.jsonl")


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("KERNEL_FALLBACK_LOG_FORMAT", "yaml", "json, console"),
        ("KERNEL_FALLBACK_LOG_FILE", "/tmp/kf-{proc}.jsonl", "{pid}, {rank}, {host}"),
    ],
    ids=["format", "file-placeholder"],
)
def test_invalid_variables_raise_naming_variable_value_and_allowed(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, allowed: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(PolicyConfigError) as info:
        kernel_fallback.reload_config()
    assert (info.value.name, info.value.value) == (name, value)
    assert name in str(info.value)
    assert repr(value) in str(info.value)
    assert allowed in str(info.value)
    with pytest.raises(PolicyConfigError, match=name):
        configure_logging()


def test_configure_logging_reads_the_variables_it_is_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_LOG_FORMAT", "console")
    monkeypatch.setenv("KERNEL_FALLBACK_LOG_FILE", str(tmp_path / "env.log"))
    out = io.StringIO()
    configure_logging(file=out)  # format from the environment, file from the argument
    fall_back()
    assert "kernel=log_add" in out.getvalue()
    assert not (tmp_path / "env.log").exists()


def test_an_installed_logger_wins_over_the_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_LOG_FILE", str(tmp_path / "env.jsonl"))
    kernel_fallback.reload_config()
    out = io.StringIO()
    configure_logging(file=out)
    fall_back()
    assert len(json_lines(out.getvalue())) == 1
    assert not (tmp_path / "env.jsonl").exists()


def test_configure_logging_touches_no_global_configuration() -> None:
    import structlog

    root_handlers = list(logging.getLogger().handlers)
    configure_logging(file=io.StringIO())
    assert not structlog.is_configured()
    assert logging.getLogger().handlers == root_handlers


def test_flush_logs_one_summary_per_key_with_exact_counts() -> None:
    out = io.StringIO()
    configure_logging(file=out)
    fall_back(1000)
    for _ in range(3):
        log_split(torch.ones(1), num_splits=2)
    assert kernel_fallback._events.flush() == 2
    summaries = [e for e in json_lines(out.getvalue()) if e["event"] == "kernel_fallback.summary"]
    assert [(s["kernel"], s.get("kwarg"), s["policy"], s["count"]) for s in summaries] == [
        ("log_add", "out", "warn", 1000),
        ("log_split", "num_splits", "warn", 3),
    ]
    for summary in summaries:
        assert summary["kind"] == "kwarg"
        assert summary["pid"] == os.getpid()
        assert summary["where"].startswith(f"{__file__}:")
        assert summary["first_seen"] <= summary["timestamp"].replace("Z", "+00:00")
        assert summary["reason"].startswith(summary["kernel"])


def test_flush_logs_nothing_when_nothing_was_counted() -> None:
    out = io.StringIO()
    configure_logging(file=out)
    assert kernel_fallback._events.flush() == 0
    fall_back()
    kernel_fallback.reset_stats()
    assert kernel_fallback._events.flush() == 0
    assert [e["event"] for e in json_lines(out.getvalue())] == ["kernel_fallback.kwarg_dropped"]


def test_provider_summaries_name_the_provider() -> None:
    out = io.StringIO()
    configure_logging(file=out)
    _events.record(("provider", "attn", "torch", "auto"))
    _events.flush()
    summary = json_lines(out.getvalue())[-1]
    assert (summary["kind"], summary["provider"], summary["count"]) == ("provider", "torch", 1)
    assert "kwarg" not in summary


def test_blank_variables_are_unset_for_configure_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_LOG_FORMAT", "  ")
    monkeypatch.setenv("KERNEL_FALLBACK_LOG_FILE", "\t")
    out = io.StringIO()
    configure_logging(file=out)
    fall_back()
    assert json_lines(out.getvalue())[0]["kernel"] == "log_add"  # json, the default


@pytest.mark.parametrize("level", [0, 1, 5, 10, 15, 20, 25, 29, 30, 31, 35, 40, 45, 50])
def test_a_level_number_filters_as_the_standard_library_does(tmp_path: Path, level: int) -> None:
    """Any number from 0 to 50 is accepted; warning events pass exactly when `logging` would pass them."""
    oracle = logging.Logger("oracle")
    oracle.setLevel(level)
    path = tmp_path / "kf.jsonl"
    configure_logging(file=path, level=level)
    fall_back()
    logged = [e["event"] for e in json_lines(path.read_text())]
    expected = ["kernel_fallback.kwarg_dropped"] if oracle.isEnabledFor(logging.WARNING) else []
    assert logged == expected


@pytest.mark.parametrize("level", [-1, 51, 10**6])
def test_a_level_number_out_of_range_is_refused_before_the_file_is_made(tmp_path: Path, level: int) -> None:
    path = tmp_path / "logs" / "kf.jsonl"
    with pytest.raises(PolicyConfigError, match=rf"level={level}\).*from 0 to 50") as info:
        configure_logging(file=path, level=level)
    assert info.value.name == "level"
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("mode", "error", "message"),
    [
        ("rb", TypeError, "a binary stream"),
        ("wb", TypeError, "a binary stream"),
        ("ab", TypeError, "a binary stream"),
        ("r", ValueError, "not writable"),
    ],
)
def test_a_stream_that_cannot_take_text_is_refused(
    tmp_path: Path, mode: str, error: type[Exception], message: str
) -> None:
    """A binary or read-only stream would fail at the first event: refused at configuration."""
    path = tmp_path / "log.txt"
    path.write_text("")
    with path.open(mode) as stream, pytest.raises(error, match=message):
        configure_logging(file=stream)
    assert _events._logger_override is None  # nothing was installed


def test_a_closed_stream_is_refused(tmp_path: Path) -> None:
    stream = (tmp_path / "log.txt").open("w")
    stream.close()
    with pytest.raises(ValueError, match="the stream is closed"):
        configure_logging(file=stream)


@pytest.mark.parametrize("mode", ["w", "a", "r+"])
def test_a_writable_text_stream_is_accepted(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "log.txt"
    path.write_text("")
    with path.open(mode) as stream:
        configure_logging(file=stream)
        fall_back()
    assert [e["event"] for e in json_lines(path.read_text())] == ["kernel_fallback.kwarg_dropped"]
