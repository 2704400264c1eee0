"""Fallback events: routing to structlog or logging, dedup, bounds, fork, failing handlers."""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import structlog
import torch
from child_env import clean_env
from structlog.testing import capture_logs
from structlog.typing import EventDict

from kernel_fallback import _events, reset_stats, stats, tolerant_kwargs
from kernel_fallback.testing import capture_fallbacks, no_fallbacks


def kernel(x: torch.Tensor) -> torch.Tensor:
    return x + 1


def test_default_routing_goes_through_the_hosts_logging_and_configures_nothing() -> None:
    script = textwrap.dedent(
        """
        import logging, sys, json, torch, structlog
        import kernel_fallback
        assert not structlog.is_configured(), "import must not configure structlog"
        assert logging.getLogger().handlers == [], "import must not configure logging"

        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record)
        logging.basicConfig(stream=sys.stdout, format="HOST %(levelname)s %(name)s %(message)s")
        logging.getLogger().addHandler(Keep())

        k = kernel_fallback.tolerant_kwargs(["out"], name="fa3")(lambda x: x * 2)
        for _ in range(3):
            k(torch.ones(2), out=torch.zeros(2))
        assert not structlog.is_configured()
        print(json.dumps(records[0].kernel_fallback))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    lines = proc.stdout.strip().splitlines()
    host_lines = [line for line in lines if line.startswith("HOST") and "kwarg_dropped" in line]
    assert len(host_lines) == 1, proc.stdout
    assert host_lines[0].startswith(
        "HOST WARNING kernel_fallback event='kernel_fallback.kwarg_dropped' kernel='fa3'"
    )
    structured = json.loads(next(line for line in lines if line.startswith("{")))
    assert structured["kernel"] == "fa3"
    assert structured["kwarg"] == "out"
    assert structured["timestamp"].endswith("Z")


def test_host_structlog_configuration_is_used_when_present() -> None:
    seen: list[EventDict] = []

    def keep(_logger: object, _method: str, event_dict: EventDict) -> EventDict:
        seen.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(processors=[keep])
    wrapped = tolerant_kwargs(["out"], name="k")(kernel)
    wrapped(torch.ones(1), out=torch.zeros(1))
    assert [(e["event"], e["kernel"]) for e in seen] == [("kernel_fallback.kwarg_dropped", "k")]


def test_a_failing_log_pipeline_never_breaks_the_kernel_call(capsys: pytest.CaptureFixture[str]) -> None:
    def broken(_logger: object, _method: str, _event_dict: EventDict) -> EventDict:
        raise OSError("log disk full")

    structlog.configure(processors=[broken])
    wrapped = tolerant_kwargs(["out"], name="k")(kernel)
    result = wrapped(torch.ones(2), out=torch.zeros(2))
    torch.testing.assert_close(result, torch.full((2,), 2.0))
    assert _events.log_errors() == 1
    assert "kernel_fallback: logging kernel_fallback.kwarg_dropped failed: OSError('log disk full')" in (
        capsys.readouterr().err
    )
    assert [row["count"] for row in stats()] == [1]


def test_a_raising_stdlib_filter_never_breaks_the_kernel_call() -> None:
    class Explode(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise RuntimeError("filter bug")

    logger = logging.getLogger("kernel_fallback")
    bad = Explode()
    logger.addFilter(bad)
    try:
        wrapped = tolerant_kwargs(["out"], name="k2")(kernel)
        wrapped(torch.ones(2), out=torch.zeros(2))
    finally:
        logger.removeFilter(bad)
    assert _events.log_errors() == 1


def test_memory_is_bounded_with_many_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_events, "MAX_ENTRIES", 5)
    with capture_logs() as logs:
        for i in range(12):
            wrapped = tolerant_kwargs(["out"], name=f"layer{i}")(kernel)
            wrapped(torch.ones(1), out=torch.zeros(1))
            wrapped(torch.ones(1), out=torch.zeros(1))
    rows = stats()
    assert len(rows) == 6
    overflow = [r for r in rows if r["kind"] == "overflow"]
    assert overflow[0]["count"] == 14  # 7 kernels past the bound, 2 calls each: still counted
    assert sum(r["count"] for r in rows) == 24
    assert [e["event"] for e in logs].count("kernel_fallback.stats_overflow") == 1
    assert len(logs) == 6


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_does_not_inherit_counts() -> None:
    wrapped = tolerant_kwargs(["out"], name="forked")(kernel)
    with capture_logs():
        for _ in range(5):
            wrapped(torch.ones(1), out=torch.zeros(1))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            before = stats()
            with capture_logs() as logs:
                wrapped(torch.ones(1), out=torch.zeros(1))
            payload = {"before": before, "after": [r["count"] for r in stats()], "logged": len(logs)}
            os.write(write, json.dumps(payload).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert child == {"before": [], "after": [1], "logged": 1}
    assert [r["count"] for r in stats()] == [5]


def test_listeners_see_every_occurrence() -> None:
    wrapped = tolerant_kwargs(
        {"out": None, "num_splits": 1}, {"out": "copy", "num_splits": "warn"}, name="k"
    )(lambda x: x * 2)
    with capture_logs(), capture_fallbacks() as events:
        wrapped(torch.ones(2), out=torch.zeros(2), num_splits=3)
        wrapped(torch.ones(2), out=torch.zeros(2))
    assert [(e.kwarg, e.policy, e.count) for e in events] == [
        ("out", "copy", 1),
        ("num_splits", "warn", 1),
        ("out", "copy", 2),
    ]
    wrapped(torch.ones(2), out=torch.zeros(2))
    assert len(events) == 3, "the listener is removed when the block ends"


def test_stats_rows_are_complete_and_reset_clears_them() -> None:
    wrapped = tolerant_kwargs(["out"], "copy", name="rows")(lambda x: x * 2)
    with capture_logs():
        wrapped(torch.ones(2), out=torch.zeros(2))
    (row,) = stats()
    assert row["kind"] == "kwarg"
    assert row["provider"] is None
    assert row["source"] == "decorator"
    assert (row["compiled_traces"], row["graph_captures"]) == (0, 0)
    assert row["first_seen"].endswith("+00:00")
    assert row["where"].startswith(__file__)
    reset_stats()
    assert stats() == []


def test_a_failing_listener_never_breaks_the_call_nor_hides_the_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def metrics_down(event: _events.FallbackEvent) -> None:
        raise ConnectionError("metrics backend down")

    _events.add_listener(metrics_down)
    try:
        wrapped = tolerant_kwargs(["out"], name="k3")(kernel)
        with capture_logs() as logs:
            for _ in range(3):
                torch.testing.assert_close(wrapped(torch.ones(2), out=torch.zeros(2)), torch.full((2,), 2.0))
    finally:
        _events.remove_listener(metrics_down)
    assert [e["event"] for e in logs] == ["kernel_fallback.kwarg_dropped"]
    assert [row["count"] for row in stats()] == [3]
    assert _events.log_errors() == 3
    assert "ConnectionError('metrics backend down')" in capsys.readouterr().err


def test_where_names_a_caller_inside_an_installed_package() -> None:
    # In system and docker Pythons, site-packages lies inside the standard library's
    # folder: a caller there is still the caller.
    wrapped = tolerant_kwargs(["out"], name="k4")(kernel)
    fake = os.path.join(os.path.dirname(functools.__file__), "site-packages", "sglang", "attn.py")
    namespace: dict[str, Any] = {"wrapped": wrapped, "torch": torch}
    exec(
        compile("def forward():\n    return wrapped(torch.ones(1), out=torch.zeros(1))\n", fake, "exec"),
        namespace,
    )
    with capture_logs() as logs:
        namespace["forward"]()
    assert logs[0]["where"] == f"{fake}:2"


def test_dropped_kernels_leave_no_static_fields_behind() -> None:
    for i in range(2000):
        tolerant_kwargs(["out"], name=f"dyn{i}")(kernel)
    gc.collect()
    assert len(_events._static_fields) < 100


# -- past the bound on stored keys (issue 11, item 5) -------------------------------------------------


def test_past_the_bound_kernels_keep_their_identity_everywhere_but_the_stored_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_events, "MAX_ENTRIES", 2)
    wrapped = [tolerant_kwargs(["out"], name=f"bounded{i}")(kernel) for i in range(4)]
    with capture_logs(), capture_fallbacks() as events:
        for w in wrapped:
            for _ in range(2):
                w(torch.ones(1), out=torch.zeros(1))
    assert [(e.kernel, e.kwarg, e.count) for e in events][4:] == [
        ("bounded2", "out", 1),
        ("bounded2", "out", 2),
        ("bounded3", "out", 1),
        ("bounded3", "out", 2),
    ]
    assert {e.fields["kernel"] for e in events} == {f"bounded{i}" for i in range(4)}
    assert [(r["kernel"], r["count"]) for r in stats()] == [
        ("bounded0", 2),
        ("bounded1", 2),
        ("<overflow>", 4),
    ]
    assert [(r["kernel"], r["kwarg"], r["count"]) for r in wrapped[3].tolerant.stats()] == [
        ("bounded3", "out", 2)
    ]
    with capture_logs(), no_fallbacks(allow=["bounded3:out"], env=False):
        wrapped[3](torch.ones(1), out=torch.zeros(1))
    reset_stats()
    assert wrapped[3].tolerant.stats() == []


def test_provider_events_name_their_provider() -> None:
    event = _events.FallbackEvent("provider", "attn", "torch", "fallback", fields={}, count=1)
    assert (event.provider, event.kwarg) == ("torch", None)
    kwarg_event = _events.FallbackEvent("kwarg", "attn", "out", "warn", fields={}, count=1)
    assert (kwarg_event.provider, kwarg_event.kwarg) == (None, "out")


_SIGNALS_DURING_RECORD = """
import json, logging, signal, sys
import torch
import kernel_fallback
from kernel_fallback import _events, stats, tolerant_kwargs

sink, log = sys.argv[1], sys.argv[2]
if sink == "stdlib":  # the host's logging, through a file handler (an RLock of its own)
    handler = logging.FileHandler(log)
    logging.getLogger("kernel_fallback").addHandler(handler)
elif sink == "metrics":  # a listener that takes prometheus_client's (plain) lock
    from prometheus_client import CollectorRegistry
    from kernel_fallback.metrics import enable_prometheus

    metrics = enable_prometheus(CollectorRegistry())

def add(x, y):
    return x + y

main_kernel = tolerant_kwargs(["out"], name="main_kernel")(add)
handler_kernel = tolerant_kwargs(["out"], name="handler_kernel")(add)
x, buf = torch.ones(2), torch.empty(2)
seen = []
_events.add_listener(seen.append)  # every call records through the events lock now
handled = 0

def on_alarm(signum, frame):  # what a SIGTERM handler does at shutdown
    global handled
    handled += 1
    kernel_fallback.flush()
    handler_kernel(x, x, out=buf)

signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, 0.003, 0.003)
calls = 50_000
for _ in range(calls):
    main_kernel(x, x, out=buf)
signal.setitimer(signal.ITIMER_REAL, 0, 0)
counts = {row["kernel"]: row["count"] for row in stats()}
out = {"calls": calls, "handled": handled, "counts": counts, "seen": len(seen)}
if sink == "metrics":
    out["metric"] = sum(s.value for m in metrics.registry.collect() for s in m.samples if s.name.endswith("_total"))
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
@pytest.mark.parametrize("sink", ["log-file", "stdlib", "metrics"])
def test_flush_and_kernels_in_a_signal_handler_do_not_deadlock_record(tmp_path: Any, sink: str) -> None:
    # SIGALRM every 3 ms while the main thread records with a listener registered: a
    # handler lands inside record()'s lock, or a log handler's, again and again. Each
    # handler flushes and calls a decorated kernel. The process used to hang at once.
    log = tmp_path / "events.jsonl"
    env = clean_env()
    if sink == "log-file":
        env.update(KERNEL_FALLBACK_LOG_FORMAT="json", KERNEL_FALLBACK_LOG_FILE=str(log))
    done = subprocess.run(
        [sys.executable, "-c", _SIGNALS_DURING_RECORD, sink, str(log)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,  # a deadlock fails here
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    handled = result["handled"]
    assert handled > 0
    # Exact, as without signals: every call counted once and seen once by the listener.
    assert result["counts"] == {"main_kernel": result["calls"], "handler_kernel": handled}
    assert result["seen"] == result["calls"] + handled
    if sink == "metrics":
        assert result["metric"] == result["calls"] + handled
    if sink == "metrics":
        return
    lines = log.read_text().splitlines()
    # Every handler's flush ran (some deferred until the interrupted record ended), and
    # the one at exit.
    if sink == "log-file":
        summaries = [json.loads(line) for line in lines if "kernel_fallback.summary" in line]
        assert sum(row["kernel"] == "main_kernel" for row in summaries) == handled + 1
    else:
        assert (
            sum("kernel_fallback.summary" in line and "main_kernel" in line for line in lines) == handled + 1
        )
