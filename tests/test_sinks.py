"""kernel_fallback._sinks: log file names and safety, line writers, fork handling, process
fields and the logger the KERNEL_FALLBACK_LOG_* variables describe."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from child_env import clean_env

import kernel_fallback
from kernel_fallback import _events, _logging, _sinks, tolerant_kwargs
from kernel_fallback._logging import configure_logging
from kernel_fallback._sinks import expand_log_path
from kernel_fallback.exceptions import LogFileError

WORKLOAD = Path(__file__).with_name("fallback_workload.py")

pytestmark = pytest.mark.usefixtures("close_log_files")


@tolerant_kwargs(drop=["out"], name="sink_add")
def sink_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.add(x, y)


@tolerant_kwargs(drop={"num_splits": 1}, name="sink_split")
def sink_split(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def fall_back(times: int = 1) -> None:
    for _ in range(times):
        sink_add(torch.ones(2), torch.ones(2), out=torch.empty(2))


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "3"}, {"rank": 3}),
        ({"LOCAL_RANK": "1"}, {"local_rank": 1}),
        ({"RANK": "5", "LOCAL_RANK": "1"}, {"rank": 5, "local_rank": 1}),
        ({"RANK": "worker-a"}, {"rank": "worker-a"}),
        ({"RANK": "²"}, {"rank": "²"}),
        ({"RANK": "٣"}, {"rank": "٣"}),
        ({"RANK": "9" * 5000}, {"rank": "9" * 5000}),
        ({"RANK": "  ", "LOCAL_RANK": " 2 "}, {"local_rank": 2}),
    ],
    ids=["rank", "local-rank", "both", "non-numeric", "superscript", "arabic-digit", "huge", "blank"],
)
def test_rank_fields_come_from_the_launchers_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: dict[str, Any]
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = io.StringIO()
    configure_logging(file=out)
    fall_back()
    (event,) = json_lines(out.getvalue())
    assert {k: event[k] for k in ("rank", "local_rank") if k in event} == expected


def test_default_routing_adds_process_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kernel_fallback"):
        fall_back()
    (record,) = caplog.records
    assert record.kernel_fallback["pid"] == os.getpid()  # type: ignore[attr-defined]
    assert record.kernel_fallback["host"] == socket.gethostname()  # type: ignore[attr-defined]


def test_file_placeholders_are_expanded_and_directories_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "2")
    configure_logging(file=tmp_path / "logs" / "kf-{rank}-{pid}-{host}.jsonl")
    fall_back(2)
    kernel_fallback._events.flush()
    path = tmp_path / "logs" / f"kf-2-{os.getpid()}-{socket.gethostname()}.jsonl"
    events = json_lines(path.read_text())
    assert [e["event"] for e in events] == ["kernel_fallback.kwarg_dropped", "kernel_fallback.summary"]
    assert events[1]["count"] == 2


def test_rank_placeholder_falls_back_to_local_rank_then_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert expand_log_path("r{rank}.jsonl") == "r0.jsonl"
    monkeypatch.setenv("LOCAL_RANK", "4")
    assert expand_log_path("r{rank}.jsonl") == "r4.jsonl"
    monkeypatch.setenv("RANK", "12")
    assert expand_log_path("r{rank}-{pid}.jsonl") == f"r12-{os.getpid()}.jsonl"
    monkeypatch.setenv("RANK", " ")  # blank is unset
    assert expand_log_path("r{rank}.jsonl") == "r4.jsonl"


@pytest.mark.parametrize(
    "rank",
    ["../../x", "..", "²", "٣", "-1", "1.5", "0x1", "a/b", "~root", "4 2"],
    ids=[
        "parent-dirs",
        "dot-dot",
        "superscript",
        "arabic-digit",
        "negative",
        "float",
        "hex",
        "slash",
        "tilde",
        "space-inside",
    ],
)
def test_a_rank_that_is_no_plain_number_gives_a_safe_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: str
) -> None:
    monkeypatch.setenv("RANK", rank)
    template = str(tmp_path / "logs" / "{rank}" / "kf-{rank}.jsonl")
    assert expand_log_path(template) == str(tmp_path / "logs" / "unknown" / "kf-unknown.jsonl")


def run_python(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run Python in a clean KERNEL_FALLBACK_* environment; a hang fails the test, never the suite."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KERNEL_FALLBACK_") and k != "RANK"}
    try:
        return subprocess.run(
            [sys.executable, *args], env={**clean, **env}, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:  # subprocess.run killed it
        pytest.fail(f"{args} did not finish in {timeout}s (blocked?): {exc.stderr!r}")


def test_a_rank_outside_the_directory_writes_every_event_inside_it(tmp_path: Path) -> None:
    # RANK=../x once wrote tmp_path/x.jsonl, and RANK=² lost every event, summaries included.
    logs = tmp_path / "logs"
    for rank in ("../x", "²"):
        proc = run_python(
            [str(WORKLOAD), "--add", "3"],
            {"RANK": rank, "KERNEL_FALLBACK_LOG_FILE": str(logs / "{rank}.jsonl")},
        )
        assert proc.returncode == 0, proc.stderr
        assert "kernel_fallback" not in proc.stderr  # no event was lost
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["unknown.jsonl"]
    events = json_lines((logs / "unknown.jsonl").read_text())
    assert [(e["event"], e["rank"]) for e in events] == [
        ("kernel_fallback.kwarg_dropped", "../x"),
        ("kernel_fallback.summary", "../x"),
        ("kernel_fallback.kwarg_dropped", "²"),
        ("kernel_fallback.summary", "²"),
    ]


def _can_set_hostname() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = [
        unshare,
        "--user",
        "--map-root-user",
        "--uts",
        sys.executable,
        "-c",
        "import socket; socket.sethostname('a')",
    ]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _can_set_hostname(), reason="needs unprivileged user and UTS namespaces (unshare)")
@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("../../evil", "_.._.._evil"),
        ("..", "_.."),
        ("~root", "_root"),
        ("a b/c", "a_b_c"),
        ("node-1.lan", "node-1.lan"),
    ],
    ids=["parent-dirs", "dot-dot", "tilde", "space-slash", "plain"],
)
def test_a_hostile_host_name_stays_one_file_name(tmp_path: Path, host: str, expected: str) -> None:
    # A real host name, set in a UTS namespace of our own; nothing is mocked.
    code = (
        f"import socket, sys; socket.sethostname({host!r}); "
        "from kernel_fallback._sinks import expand_log_path; print(expand_log_path(sys.argv[1]))"
    )
    template = str(tmp_path / "logs" / "kf-{host}" / "{host}.jsonl")
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--uts", sys.executable, "-c", code, template],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "logs" / f"kf-{expected}" / f"{expected}.jsonl")


def test_lines_appended_by_many_writers_stay_whole(tmp_path: Path) -> None:
    # Two loggers on one file stand for two processes; threads write at once.
    path = tmp_path / "shared.jsonl"
    writers = [_sinks._LineWriter(str(path), None) for _ in range(2)]
    payload = "x" * 20000  # longer than any stdio buffer, so a torn line would show

    def write(writer: _sinks._LineWriter, n: int) -> None:
        for i in range(200):
            writer.msg(json.dumps({"writer": n, "i": i, "payload": payload}))

    threads = [threading.Thread(target=write, args=(w, n)) for n, w in enumerate(writers * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for writer in writers:
        writer.close()
    lines = json_lines(path.read_text())
    assert len(lines) == 800
    assert all(line["payload"] == payload for line in lines)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_summarises_only_its_own_counts(tmp_path: Path) -> None:
    configure_logging(file=tmp_path / "kf-{pid}.jsonl")
    fall_back(5)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child writes its own file and leaves
        try:
            fall_back(1)
            _events._flush_at_exit()  # what its exit hook runs
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child = json_lines((tmp_path / f"kf-{pid}.jsonl").read_text())
    assert [(e["event"], e["pid"], e.get("count")) for e in child] == [
        ("kernel_fallback.kwarg_dropped", pid, None),
        ("kernel_fallback.summary", pid, 1),
    ]
    _events.flush()
    parent = json_lines((tmp_path / f"kf-{os.getpid()}.jsonl").read_text())
    assert [e.get("count") for e in parent if e["event"] == "kernel_fallback.summary"] == [5]
    # Each process has its own random instance id, the same on all its events.
    assert {e["instance"] for e in parent} == {parent[0]["instance"]}
    assert {e["instance"] for e in child} == {child[0]["instance"]}
    assert child[0]["instance"] != parent[0]["instance"]
    assert all(re.fullmatch("[0-9a-f]{16}", e["instance"]) for e in parent + child)


def test_real_processes_summarise_at_exit_without_double_counting(tmp_path: Path) -> None:
    # One process, its multiprocessing 'fork' child, one shared file: the parent's
    # summary comes from atexit, the child's from its multiprocessing finalizer.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNEL_FALLBACK_")}
    env["KERNEL_FALLBACK_LOG_FILE"] = str(tmp_path / "shared.jsonl")
    proc = subprocess.run(
        [sys.executable, str(WORKLOAD), "--add", "3", "--fork-child", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    events = json_lines((tmp_path / "shared.jsonl").read_text())
    summaries = {e["pid"]: e["count"] for e in events if e["event"] == "kernel_fallback.summary"}
    firsts = [e["pid"] for e in events if e["event"] == "kernel_fallback.kwarg_dropped"]
    assert sorted(summaries.values()) == [2, 3]
    assert sorted(firsts) == sorted(summaries)
    assert len(events) == 4
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", e["timestamp"]) for e in events)


# --- the logger the KERNEL_FALLBACK_LOG_* variables describe ----------------------


def test_variables_apply_at_the_first_event_not_on_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_LOG_FILE", str(tmp_path / "kf-{pid}.jsonl"))
    kernel_fallback.reload_config()
    path = tmp_path / f"kf-{os.getpid()}.jsonl"
    assert not path.exists()
    fall_back(4)
    kernel_fallback._events.flush()
    events = json_lines(path.read_text())
    assert [(e["event"], e.get("count")) for e in events] == [
        ("kernel_fallback.kwarg_dropped", None),
        ("kernel_fallback.summary", 4),
    ]


def test_the_variables_alone_write_the_log_where_only_a_kernel_is_imported(tmp_path: Path) -> None:
    # A plain process imports no more than the decorator; the package imports lazily,
    # so _logging never loads. The file was once never written: the environment's
    # logger was a factory that only importing _logging registered.
    code = textwrap.dedent(
        """
        import sys
        import torch
        from kernel_fallback import tolerant_kwargs

        @tolerant_kwargs(drop=["out"], name="plain_add")
        def plain_add(x, y):
            return torch.add(x, y)

        result = plain_add(torch.ones(2), torch.ones(2), out=torch.empty(2))
        assert torch.equal(result, torch.full((2,), 2.0)), result
        print(sorted(m for m in sys.modules if m.startswith("kernel_fallback")))
        """
    )
    path = tmp_path / "logs" / "kf-{pid}.jsonl"
    proc = run_python(
        ["-c", code], {"KERNEL_FALLBACK_LOG_FORMAT": "json", "KERNEL_FALLBACK_LOG_FILE": str(path)}
    )
    assert proc.returncode == 0, proc.stderr
    assert "kernel_fallback" not in proc.stderr  # no event was lost
    assert "kernel_fallback._logging" not in ast.literal_eval(proc.stdout.strip())
    (written,) = (tmp_path / "logs").iterdir()
    assert re.fullmatch(r"kf-\d+\.jsonl", written.name)
    events = json_lines(written.read_text())
    assert [(e["event"], e["kernel"], e["kwarg"], e["policy"], e.get("count")) for e in events] == [
        ("kernel_fallback.kwarg_dropped", "plain_add", "out", "warn", None),
        ("kernel_fallback.summary", "plain_add", "out", "warn", 1),
    ]
    assert events[0]["pid"] == int(written.name[3:-6])
    assert list(events[0])[:3] == ["timestamp", "level", "event"]


def test_format_variable_alone_logs_json_to_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_LOG_FORMAT", "JSON")
    kernel_fallback.reload_config()
    fall_back()
    (event,) = json_lines(capsys.readouterr().err)
    assert event["kernel"] == "sink_add"


# --- what a log file may be ---------------------------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "logs" / "kf.jsonl"
    path.parent.mkdir()
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("reader", [False, True], ids=["no-reader", "with-reader"])
def test_a_fifo_named_by_the_variable_never_blocks_a_kernel_call(fifo: Path, reader: bool) -> None:
    # Before, the first fallback blocked forever in open() when nobody read the FIFO.
    read_end = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK) if reader else -1
    try:
        proc = run_python(
            [str(WORKLOAD), "--add", "3", "--attn", "2"], {"KERNEL_FALLBACK_LOG_FILE": str(fifo)}, timeout=60
        )
        if reader:
            assert os.read(read_end, 1 << 16) == b""  # nothing was written into the pipe
    finally:
        if read_end >= 0:
            os.close(read_end)
    assert proc.returncode == 0, proc.stderr  # the workload checked its results
    # Four events were lost (two first occurrences, two summaries): one report.
    (line,) = [ln for ln in proc.stderr.splitlines() if "kernel_fallback" in ln]
    assert line.startswith("kernel_fallback: logging kernel_fallback.kwarg_dropped failed: LogFileError(")
    assert f"KERNEL_FALLBACK_LOG_FILE={str(fifo)!r}: {str(fifo)!r} is a FIFO (named pipe)" in line
    assert "a log file must be a regular file" in line


@pytest.mark.parametrize("reader", [False, True], ids=["no-reader", "with-reader"])
def test_configure_logging_refuses_a_fifo_at_once(fifo: Path, reader: bool) -> None:
    read_end = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK) if reader else -1
    try:
        proc = run_python([str(WORKLOAD), "--configure-file", str(fifo)], {}, timeout=60)
    finally:
        if read_end >= 0:
            os.close(read_end)
    assert proc.returncode == 1
    assert (
        f"kernel_fallback.exceptions.LogFileError: configure_logging(file={str(fifo)!r}): "
        f"{str(fifo)!r} is a FIFO (named pipe); a log file must be a regular file" in proc.stderr
    )


def test_other_kinds_of_file_are_refused(tmp_path: Path) -> None:
    for path, kind in ((tmp_path, "a directory"), (Path(os.devnull), "a character device")):
        with pytest.raises(
            LogFileError, match=re.escape(f"{str(path)!r} is {kind}; a log file must be")
        ) as info:
            configure_logging(file=path)
        assert (info.value.path, info.value.reason) == (str(path), kind)
        assert isinstance(info.value, OSError)
    assert _logging._configured is None  # nothing was installed


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path, dangling: bool) -> None:
    target = tmp_path / "elsewhere" / "victim.txt"
    target.parent.mkdir()
    if not dangling:
        target.write_text("precious\n")
    link = tmp_path / "logs" / "kf-0.jsonl"
    link.parent.mkdir()
    link.symlink_to(target)
    with pytest.raises(
        LogFileError, match=re.escape(f"{str(link)!r} is a symbolic link; a log file must be")
    ):
        configure_logging(file=tmp_path / "logs" / "kf-{rank}.jsonl")
    assert target.exists() is not dangling
    if not dangling:
        assert target.read_text() == "precious\n"


def test_a_symlink_named_by_the_variable_loses_events_not_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    link = tmp_path / "kf.jsonl"
    link.symlink_to(target)
    monkeypatch.setenv("KERNEL_FALLBACK_LOG_FILE", str(link))
    kernel_fallback.reload_config()
    fall_back(3)
    sink_split(torch.ones(1), num_splits=2)
    assert _events.flush() == 2
    assert target.read_text() == "precious\n"
    assert _events.log_errors() == 4  # every lost event is counted...
    (line,) = capsys.readouterr().err.splitlines()  # ...and reported once
    assert "is a symbolic link" in line
    # Fixed, and reloaded: events flow again.
    link.unlink()
    kernel_fallback.reload_config()
    kernel_fallback.reset_stats()
    fall_back()
    assert [e["event"] for e in json_lines(link.read_text())] == ["kernel_fallback.kwarg_dropped"]


def test_threads_meeting_a_refused_file_at_once_all_go_on_and_it_is_reported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "target").write_text("")
    (tmp_path / "kf.jsonl").symlink_to(tmp_path / "target")
    monkeypatch.setenv("KERNEL_FALLBACK_LOG_FILE", str(tmp_path / "kf.jsonl"))
    kernel_fallback.reload_config()

    def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # a kernel without `out`
        return torch.add(x, y)

    kernels = [tolerant_kwargs(drop=["out"], name=f"threaded_{i}")(add) for i in range(8)]
    barrier = threading.Barrier(len(kernels))
    results: list[bool] = []

    def call(fn: Any) -> None:
        barrier.wait()
        results.append(
            bool(torch.equal(fn(torch.ones(2), torch.ones(2), out=torch.empty(2)), torch.full((2,), 2.0)))
        )

    threads = [threading.Thread(target=call, args=(fn,)) for fn in kernels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * len(kernels)
    assert _events.log_errors() == len(kernels)
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert (tmp_path / "target").read_text() == ""


def test_a_file_that_cannot_be_opened_says_why(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 300)  # longer than any file system allows a name to be
    with pytest.raises(
        LogFileError, match=re.escape(f"cannot open {str(path)!r} for appending: File name too long")
    ):
        configure_logging(file=path)


def test_the_log_file_is_opened_blocking_and_close_on_exec(tmp_path: Path) -> None:
    configure_logging(file=tmp_path / "kf.jsonl")
    writer = _logging._configured
    assert writer is not None
    fd = writer._fd
    assert stat.S_ISREG(os.fstat(fd).st_mode)
    assert os.get_blocking(fd)
    assert not os.get_inheritable(fd)


# --- layering --------------------------------------------------------------------------


def _imported_names(module: ModuleType) -> set[str]:
    """Every module name and imported name in ``module``'s import statements, at any depth."""
    tree = ast.parse(Path(str(module.__file__)).read_text())
    names = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    return names | {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }


@pytest.mark.parametrize(
    ("module", "must_import", "must_not_import"),
    [
        (_sinks, {"_config"}, {"_events", "_logging"}),
        (_events, {"_sinks"}, {"_logging"}),
        (_logging, {"_sinks", "_events"}, set()),
    ],
    ids=["sinks", "events", "logging"],
)
def test_layering_is_one_way(module: ModuleType, must_import: set[str], must_not_import: set[str]) -> None:
    # _sinks below _events below _logging: no cycle, and no hook that a module must
    # have been imported to register.
    imported = _imported_names(module)
    assert {name for name in must_import if any(name in i for i in imported)} == must_import
    assert not {name for name in imported for bad in must_not_import if bad in name}


def test_importing_a_lower_layer_loads_no_higher_one() -> None:
    code = (
        "import sys; import kernel_fallback._sinks; a = sorted(sys.modules); "
        "import kernel_fallback._events; print(a); print(sorted(sys.modules))"
    )
    proc = run_python(["-c", code], {})
    assert proc.returncode == 0, proc.stderr
    after_sinks, after_events = (ast.literal_eval(line) for line in proc.stdout.splitlines())
    assert "kernel_fallback._sinks" in after_sinks
    assert not {"kernel_fallback._events", "kernel_fallback._logging"} & set(after_sinks)
    assert "kernel_fallback._events" in after_events
    assert "kernel_fallback._logging" not in after_events


# --- separate PID namespaces, rotation, a write cut short -----------------------------


def _unshare_pid() -> list[str] | None:
    """The command prefix that runs a process as pid 1 of a new PID namespace, or None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for prefix in ([unshare, "--pid", "--fork"], [unshare, "--user", "--map-root-user", "--pid", "--fork"]):
        probe = [*prefix, sys.executable, "-c", "import os, sys; sys.exit(os.getpid() != 1)"]
        if subprocess.run(probe, capture_output=True, check=False, timeout=60).returncode == 0:
            return prefix
    return None


UNSHARE_PID = _unshare_pid()


@pytest.mark.skipif(UNSHARE_PID is None, reason="needs PID namespaces (unshare --pid)")
def test_ranks_in_separate_pid_namespaces_are_counted_apart(tmp_path: Path) -> None:
    """Two containers on one host name, each workload pid 1, one shared log: two processes."""
    assert UNSHARE_PID is not None
    log = tmp_path / "shared.jsonl"
    env = clean_env(KERNEL_FALLBACK_LOG_FORMAT="json", KERNEL_FALLBACK_LOG_FILE=str(log))
    for calls in (5, 7):
        proc = subprocess.run(
            [*UNSHARE_PID, sys.executable, str(WORKLOAD), "--add", str(calls)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
    events = json_lines(log.read_text())
    assert {(e["pid"], e["host"]) for e in events} == {(1, socket.gethostname())}
    report = subprocess.run(
        [sys.executable, "-m", "kernel_fallback", "report", "--format", "json", str(log)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    (row,) = json.loads(report.stdout)["fallbacks"]
    assert (row["kernel"], row["count"], row["processes"], row["exact"]) == ("toy_add", 12, 2, True)


@pytest.mark.parametrize("how", ["rename", "delete"])
def test_a_rotated_log_file_is_reopened_and_nothing_is_lost(tmp_path: Path, how: str) -> None:
    """logrotate moves or deletes the file: events after the next check go to a new file."""
    path = tmp_path / "kf.jsonl"
    configure_logging(file=path)
    fall_back(1)  # the first occurrence: one line
    rotated = tmp_path / "kf.jsonl.1"
    if how == "rename":
        path.rename(rotated)
    else:
        path.unlink()
    time.sleep(_sinks.REOPEN_CHECK_S + 0.1)  # the path is looked up again at most this often
    _events.flush()  # a summary
    assert path.exists(), "the writer never noticed the rotation"
    after = json_lines(path.read_text())
    assert [e["event"] for e in after] == ["kernel_fallback.summary"]
    if how == "rename":
        assert [e["event"] for e in json_lines(rotated.read_text())] == ["kernel_fallback.kwarg_dropped"]


def test_a_path_replaced_by_a_symlink_after_rotation_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kf.jsonl"
    writer = _sinks._LineWriter(str(path), None)
    writer.msg("{}")
    path.unlink()
    target = tmp_path / "target"
    target.write_text("")
    path.symlink_to(target)
    time.sleep(_sinks.REOPEN_CHECK_S + 0.1)
    with pytest.raises(LogFileError, match="is a symbolic link"):
        writer.msg("{}")
    writer.close()
    assert target.read_text() == ""


#: Writes an event too big for the room left, then, with room again, a complete one.
_CUT_SHORT = """
import json, os, resource, signal, sys
from kernel_fallback._sinks import _LineWriter
path, how = sys.argv[1], sys.argv[2]
writer = _LineWriter(path, None)
big = json.dumps({"event": "kernel_fallback.summary", "kernel": "cut", "kwarg": "out",
                  "policy": "warn", "count": 1, "pad": "x" * 6000})
whole = json.dumps({"event": "kernel_fallback.summary", "kernel": "whole", "kwarg": "out",
                    "policy": "warn", "count": 2})
if how == "rlimit":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG rather than death past the limit
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))
else:  # a full tmpfs: fill all but one page of it
    filler = os.path.join(os.path.dirname(path), "filler")
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(bytes(512))
                f.flush()
                if os.statvfs(filler).f_bavail * os.statvfs(filler).f_frsize <= 4096:
                    break
        except OSError:
            pass
try:
    writer.msg(big)
except OSError as exc:
    print("failed:", exc.errno)
if how == "rlimit":
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
else:
    os.unlink(filler)
writer.msg(whole)
writer.close()
"""


def _tmpfs(directory: Path) -> bool:
    directory.mkdir()
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        return False
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)], capture_output=True, check=False
    )
    return done.returncode == 0


@pytest.mark.parametrize("how", ["rlimit", "tmpfs"])
def test_after_a_write_cut_short_the_next_event_starts_a_fresh_line(tmp_path: Path, how: str) -> None:
    """A full disk cuts an event part-way; the next complete one is not glued to it, and is read."""
    directory = tmp_path / "logs"
    if how == "tmpfs":
        if not _tmpfs(directory):
            pytest.skip("needs root to mount a small tmpfs")
    else:
        directory.mkdir()
    try:
        path = directory / "kf.jsonl"
        proc = subprocess.run(
            [sys.executable, "-c", _CUT_SHORT, str(path), how],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("failed:"), "the write was not cut short"
        data = path.read_bytes()
        assert 0 < data.index(b"\n") < 6000  # the cut line, then a fresh one
        report = subprocess.run(
            [sys.executable, "-m", "kernel_fallback", "report", "--format", "json", str(path)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        result = json.loads(report.stdout)
        assert [(r["kernel"], r["count"]) for r in result["fallbacks"]] == [("whole", 2)]
        assert result["malformed_lines"] == 1
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(directory)], check=False)


def test_a_stream_write_that_failed_is_followed_by_a_fresh_line(tmp_path: Path) -> None:
    """A real pipe whose reader is gone fails a write; once it works again, lines start fresh."""
    good = tmp_path / "out.txt"
    with good.open("w") as sink:
        writer = _sinks._LineWriter(None, sink)
        read_end, write_end = os.pipe()
        os.close(read_end)
        broken = os.fdopen(write_end, "w")
        writer.stream = broken
        with pytest.raises(BrokenPipeError):
            writer.msg('{"event": "first"}')
        with contextlib.suppress(BrokenPipeError):
            broken.close()
        writer.stream = sink
        writer.msg('{"event": "second"}')
    assert good.read_text() == '\n{"event": "second"}\n'
