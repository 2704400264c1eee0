"""The kernel-fallback command: report, check and config, on logs of real processes."""

from __future__ import annotations

import gc
import gzip
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from child_env import clean_env

from kernel_fallback._cli import main

WORKLOAD = Path(__file__).with_name("fallback_workload.py")
#: (RANK, workload arguments): rank 2 is "killed" before its summary is written.
RUNS = [
    ("0", ["--add", "5", "--attn", "1"]),
    ("1", ["--add", "7"]),
    ("2", ["--add", "2", "--attn", "3", "--killed"]),
]
FOREIGN_LINES = [
    "INFO server started on :8000",
    '{"msg": "another json log"}',
    "[1, 2, 3]",
    "\x00\x01 binary",
]


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Logs of three real processes run at once, one per rank; rank 1's gzipped."""
    directory = tmp_path_factory.mktemp("logs")
    template = str(directory / "kf-rank{rank}-{pid}.jsonl")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKLOAD), *args],
            env=clean_env(RANK=rank, KERNEL_FALLBACK_LOG_FORMAT="json", KERNEL_FALLBACK_LOG_FILE=template),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, args in RUNS
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    files = {f.name.split("-")[1]: f for f in directory.iterdir()}
    assert sorted(files) == ["rank0", "rank1", "rank2"]
    gz = files["rank1"].with_suffix(".jsonl.gz")
    gz.write_bytes(gzip.compress(files["rank1"].read_bytes()))
    files["rank1"].unlink()
    with files["rank0"].open("a") as f:  # other programs' lines in the same file
        f.write("\n".join(FOREIGN_LINES) + "\n")
    return [files["rank0"], gz, files["rank2"]]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def report_json(paths: list[Path], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = run(["report", "--format", "json", *map(str, paths)], capsys)
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def test_report_merges_processes_summaries_and_first_occurrences(
    logs: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = report_json(logs, capsys)
    rows = {(r["kernel"], r["kwarg"]): r for r in data["fallbacks"]}
    assert sorted(rows) == [("toy_add", "out"), ("toy_attn", "num_splits")]
    add, attn = rows["toy_add", "out"], rows["toy_attn", "num_splits"]
    # ranks 0 and 1 summarised 5 and 7; rank 2 was killed after its first occurrence.
    assert (add["count"], add["exact"], add["processes"], add["policy"]) == (13, False, 3, "copy")
    assert (attn["count"], attn["exact"], attn["processes"], attn["policy"]) == (2, False, 2, "warn")
    assert add["ranks"] == [0, 1, 2]
    assert attn["ranks"] == [0, 2]
    assert add["where"].startswith(f"{WORKLOAD}:")
    assert add["first_seen"].endswith("Z")
    assert add["reason"] == "toy_add does not accept 'out' (signature)"
    assert data["processes"] == 3
    assert data["ignored_lines"] == len(FOREIGN_LINES)
    assert data["files"] == [str(p) for p in logs]


def test_report_counts_are_exact_when_every_process_summarised(
    logs: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = report_json(logs[:2], capsys)
    assert [(r["kernel"], r["count"], r["exact"]) for r in data["fallbacks"]] == [
        ("toy_add", 12, True),
        ("toy_attn", 1, True),
    ]


def test_report_table(logs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["report", *map(str, logs)], capsys)
    assert code == 0
    header, add, attn, *footer = out.splitlines()
    assert header.split()[:7] == ["KERNEL", "KIND", "KWARG/PROVIDER", "POLICY", "COUNT", "PROCS", "FIRST"]
    assert add.split()[:6] == ["toy_add", "kwarg", "out", "copy", ">=13", "3"]
    assert attn.split()[:6] == ["toy_attn", "kwarg", "num_splits", "warn", ">=2", "2"]
    assert footer[0].startswith("3 file(s)")
    assert f"{len(FOREIGN_LINES)} line(s) ignored" in footer[0]
    assert "lower bound" in footer[1]


def test_the_latest_summary_of_a_process_wins_over_earlier_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {"kernel": "k", "kwarg": "out", "policy": "warn", "pid": 7, "host": "h"}
    lines = [
        {**base, "event": "kernel_fallback.kwarg_dropped", "timestamp": "2026-01-01T00:00:00Z"},
        {**base, "event": "kernel_fallback.summary", "count": 40, "timestamp": "2026-01-01T00:00:02Z"},
        {**base, "event": "kernel_fallback.summary", "count": 10, "timestamp": "2026-01-01T00:00:01Z"},
        {
            **base,
            "pid": 8,
            "event": "kernel_fallback.summary",
            "count": 2,
            "timestamp": "2026-01-01T00:00:03Z",
        },
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (row,) = report_json([path], capsys)["fallbacks"]
    assert (row["count"], row["exact"], row["processes"]) == (42, True, 2)
    assert row["first_seen"] == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_report_reads_standard_input(logs: list[Path], compress: bool) -> None:
    data = logs[0].read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "kernel_fallback", "report", "--format", "json", "-"],
        input=gzip.compress(data) if compress else data,
        env=clean_env(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["fallbacks"]
    assert [(r["kernel"], r["count"]) for r in rows] == [("toy_add", 5), ("toy_attn", 1)]


def test_report_of_logs_without_fallbacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "quiet.log"
    path.write_text("\n".join(FOREIGN_LINES) + "\n")
    code, out, err = run(["report", str(path)], capsys)
    assert code == 0
    assert out.startswith("No fallbacks.")
    assert "KERNEL_FALLBACK_LOG_FORMAT=json" in err


@pytest.mark.parametrize(
    ("allow", "env", "code", "denied"),
    [
        ([], None, 1, ["toy_add", "toy_attn"]),
        (["--allow", "toy_add:out"], None, 1, ["toy_attn"]),
        (["--allow", "toy_add:out,toy_attn:*"], None, 0, []),
        (["--allow", "toy_add:out", "--allow", "*:num_splits"], None, 0, []),
        ([], "toy_*:*", 0, []),
        (["--allow", "toy_attn:num_splits"], "toy_add:out", 0, []),
        (["--allow", "toy_add:ou"], None, 1, ["toy_add", "toy_attn"]),
    ],
    ids=[
        "nothing-allowed",
        "one-allowed",
        "comma-list",
        "repeated",
        "env-glob",
        "option-and-env",
        "no-prefix-match",
    ],
)
def test_check_gates_on_fallbacks_not_allowed(
    logs: list[Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    allow: list[str],
    env: str | None,
    code: int,
    denied: list[str],
) -> None:
    if env is not None:
        monkeypatch.setenv("KERNEL_FALLBACK_ALLOW", env)
    got, out, _ = run(["check", *map(str, logs), *allow], capsys)
    assert got == code
    if denied:
        assert out.startswith(f"kernel-fallback check: FAILED: {len(denied)} fallback(s) not allowed")
        assert [line.split()[0] for line in out.splitlines()[2 : 2 + len(denied)]] == denied
        assert "--allow" in out.splitlines()[-1]
    else:
        assert out.startswith("kernel-fallback check: ok: 2 fallback(s), all allowed")


def test_check_json_and_stale_allow_patterns(logs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        ["check", "--format", "json", *map(str, logs), "--allow", "toy_add:*,gone:out"], capsys
    )
    data = json.loads(out)
    assert code == 1
    assert data["ok"] is False
    assert [r["kernel"] for r in data["denied"]] == ["toy_attn"]
    assert [r["kernel"] for r in data["allowed"]] == ["toy_add"]
    assert data["unused_allow"] == ["gone:out"]


def test_check_passes_logs_without_fallbacks_only_when_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    code, out, _ = run(["check", "--allow-empty", str(path)], capsys)
    assert (code, out.strip()) == (0, "kernel-fallback check: ok: no fallbacks (0 event(s) in 1 file(s)).")


def our_event(**fields: Any) -> str:
    event = {"event": "kernel_fallback.summary", "kernel": "k", "kwarg": "out", "policy": "warn", "count": 1}
    return json.dumps({**event, **fields})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            our_event(count="3x") + "\n",
            r"bad\.jsonl:1: kernel_fallback\.summary event: 'count' must be a non-negative integer, got '3x'",
        ),
        (
            "\n" + our_event(count=-1) + "\n",
            r"bad\.jsonl:2: .*'count' must be a non-negative integer, got -1",
        ),
        (our_event(kernel=3) + "\n", r"'kernel' must be a non-empty string, got 3"),
        (our_event(kwarg=None) + "\n", r"names no keyword or provider"),
        (our_event(policy=["warn"]) + "\n", r"'policy' must be a string"),
    ],
    ids=["count-text", "count-negative", "kernel-number", "no-subject", "policy-list"],
)
def test_malformed_events_are_errors_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    for command in ("report", "check"):
        code, out, err = run([command, str(path)], capsys)
        assert code == 2
        assert out == ""
        assert err.startswith("kernel-fallback: error: ")
        assert re.search(message, err), err


def test_damaged_gzip_is_an_input_error(
    logs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(logs[1].read_bytes()[:-12])
    code, _, err = run(["report", str(truncated)], capsys)
    assert code == 2
    assert err.startswith(f"kernel-fallback: error: {truncated}: cannot read: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "{tmp}/missing.jsonl"], "{tmp}/missing.jsonl: cannot read: No such file or directory"),
        (["check", "{tmp}"], "{tmp}: cannot read: it is a directory; a log must be a regular file"),
        (["check", "{tmp}/missing.jsonl"], "missing.jsonl: cannot read"),
        (["check", "--allow", "toy_add", "{tmp}/missing.jsonl"], "'toy_add' is not a 'kernel:kwarg' pattern"),
        (["report"], "the following arguments are required: FILE"),
        (["report", "--format", "yaml", "x"], "invalid choice: 'yaml'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
    ids=[
        "missing-file",
        "directory",
        "check-missing",
        "bad-allow",
        "no-files",
        "bad-format",
        "bad-command",
        "no-command",
    ],
)
def test_user_mistakes_exit_2_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 2
    assert message.format(tmp=tmp_path) in err
    assert "Traceback" not in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    assert all(command in out for command in ("report", "check", "config"))


@pytest.fixture
def kernel_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module declaring one kernel, importable by a name unique to the test."""
    name = f"cli_kernels_{os.getpid()}_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from kernel_fallback import tolerant_kwargs

            @tolerant_kwargs(drop={"out": None, "num_splits": 1}, on_drop={"out": "copy"}, name="cli_attn")
            def cli_attn(q):
                return q
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    gc.collect()  # the module's kernel leaves kernel_fallback.kernels() with it


def test_config_shows_policies_of_imported_kernels(
    kernel_module: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP__CLI_ATTN", "num_splits=raise")
    code, out, err = run(["config", "--import", kernel_module], capsys)
    assert (code, err) == (0, "")
    assert "KERNEL_FALLBACK_ON_DROP__CLI_ATTN = 'num_splits=raise'" in out
    assert "KERNEL_FALLBACK_STRICT" in out  # every known variable is listed, set or not
    assert "out              lacks    policy=copy   from decorator" in out
    assert "num_splits       lacks    policy=raise  from KERNEL_FALLBACK_ON_DROP__CLI_ATTN" in out


def test_config_json(kernel_module: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["config", "--format", "json", "--import", kernel_module], capsys)
    data = json.loads(out)
    assert code == 0
    assert data["ok"] is True
    (kernel,) = [k for k in data["kernels"] if k["kernel"] == "cli_attn"]
    assert kernel["missing"] == ["out", "num_splits"]
    assert {v["name"]: v["status"] for v in data["variables"]}["KERNEL_FALLBACK_ON_DROP"] == "unset"


@pytest.mark.parametrize(
    ("name", "value", "status", "message"),
    [
        ("KERNEL_FALLBACK_STICT", "1", "invalid", "Did you mean 'KERNEL_FALLBACK_STRICT'?"),
        (
            "KERNEL_FALLBACK_ON_DROP_CLI_ATTN",
            "warn",
            "invalid",
            "Did you mean 'KERNEL_FALLBACK_ON_DROP__CLI_ATTN'?",
        ),
        ("KERNEL_FALLBACK_LOGFILE", "x.jsonl", "invalid", "Did you mean 'KERNEL_FALLBACK_LOG_FILE'?"),
        ("KERNEL_FALLBACK_STRICT", "maybe", "invalid", "use one of true, false, 1, 0, yes, no, on, off"),
        ("KERNEL_FALLBACK_ON_DROP", "warm", "invalid", "use one of warn, copy, raise. Did you mean 'warn'?"),
        ("KERNEL_FALLBACK_LOG_FORMAT", "yaml", "invalid", "use one of json, console"),
        ("KERNEL_FALLBACK_ALLOW", "cli_attn", "invalid", "'cli_attn' is not a 'kernel:kwarg' pattern"),
        ("KERNEL_FALLBACK_ON_DROP__CLI_ATTN", "splits=warn", "invalid", "Did you mean 'num_splits'?"),
        ("KERNEL_FALLBACK_ON_DROP__CLI_ATN", "warm", "invalid", "Did you mean 'warn'?"),
    ],
    ids=[
        "typo",
        "single-underscore",
        "close-name",
        "bool",
        "policy",
        "format",
        "allow",
        "kernel-kwarg",
        "kernel-policy",
    ],
)
def test_config_rejects_invalid_variables(
    kernel_module: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
    status: str,
    message: str,
) -> None:
    monkeypatch.setenv(name, value)
    code, out, err = run(["config", "--import", kernel_module], capsys)
    assert code == 1
    assert f"kernel-fallback: {status} variable {name}: " in err
    assert message in err
    assert f"[{status}]" in out
    assert "Traceback" not in err


def test_config_does_not_fail_on_a_kernel_it_cannot_see(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_ON_DROP__SOMEWHERE_ELSE", "copy")
    code, out, _ = run(["config"], capsys)
    assert code == 0
    assert "[unchecked] no kernel named 'SOMEWHERE_ELSE' is registered" in out


def test_config_import_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["config", "--import", "no_such_module_here"], capsys)
    assert code == 2
    assert err == (
        "kernel-fallback: error: --import no_such_module_here: cannot import it: "
        "No module named 'no_such_module_here'\n"
    )


def test_python_dash_m_runs_the_command(tmp_path: Path) -> None:
    """The installed entry points run main(): exit status and messages, in real processes."""
    missing = subprocess.Popen(
        [sys.executable, "-m", "kernel_fallback", "report", str(tmp_path / "nope.jsonl")],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    typo = subprocess.Popen(
        [sys.executable, "-m", "kernel_fallback", "config"],
        env=clean_env(KERNEL_FALLBACK_STICT="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, missing_err = missing.communicate(timeout=120)
    typo_out, typo_err = typo.communicate(timeout=120)
    assert missing.returncode == 2
    assert f"kernel-fallback: error: {tmp_path / 'nope.jsonl'}: cannot read" in missing_err
    assert "Traceback" not in missing_err
    assert typo.returncode == 1
    assert "Did you mean 'KERNEL_FALLBACK_STRICT'?" in typo_err
    assert "KERNEL_FALLBACK_STICT" in typo_out


@pytest.mark.parametrize(
    ("line", "counted"),
    [
        (our_event(), True),
        (json.dumps({"message": "m", "kernel_fallback": json.loads(our_event())}), True),
        (our_event(level="info"), False),
        (json.dumps({"event": "kernel_fallback.config_loaded", "pid": 1}), False),
        (json.dumps({"event": "request_done", "kernel": "k", "kwarg": "out", "count": 1}), False),
        ("2026-01-01T00:00:00Z [warning  ] kernel_fallback.summary  kernel=k kwarg=out count=1", False),
        (our_event()[:-5], False),
    ],
    ids=[
        "ours",
        "nested-stdlib-json",
        "info-level",
        "ours-not-a-fallback",
        "other-event",
        "console",
        "cut-short",
    ],
)
def test_which_lines_count_as_fallbacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, counted: bool
) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(line + "\n")
    data = report_json([path], capsys)
    assert [r["count"] for r in data["fallbacks"]] == ([1] if counted else [])


def test_provider_and_dispatch_events_merge_with_their_summaries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # First-occurrence events of providers state no kind; summaries do.
    from kernel_fallback import _events, _logging

    path = tmp_path / "kf.jsonl"
    _logging.configure_logging(file=path)
    try:
        keys = {
            ("provider", "cli_chain", "torch", "fallback"): {"event": "kernel_fallback.provider_fallback"},
            ("dispatch", "cli_chain", "fa2", "route:sinks"): {"event": "kernel_fallback.dispatch"},
        }
        for (kind, kernel, chosen, policy), fields in keys.items():
            _events.describe_key(
                (kind, kernel, chosen, policy),
                {**fields, "kernel": kernel, "chosen": chosen, "policy": policy, "reason": "r"},
            )
            for _ in range(3):
                _events.record((kind, kernel, chosen, policy))
        _events.flush()
    finally:
        assert _logging._configured is not None
        _logging._configured.close()
    rows = report_json([path], capsys)["fallbacks"]
    assert [(r["kind"], r["provider"], r["policy"], r["count"], r["exact"]) for r in rows] == [
        ("dispatch", "fa2", "route:sinks", 3, True),
        ("provider", "torch", "fallback", 3, True),
    ]


def test_check_refuses_console_logs_that_show_fallbacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "console.log"
    path.write_text(
        "startup ok\n"
        "2026-01-01T00:00:00Z [warning  ] kernel_fallback.kwarg_dropped  kernel=fa3 kwarg=out policy=warn\n"
    )
    code, out, err = run(["check", str(path)], capsys)
    assert code == 2
    assert "1 line(s) name kernel_fallback events but are not JSON" in err
    assert "ok" not in out


@pytest.mark.parametrize(
    ("value", "code", "expected"),
    [
        ("torch", 0, "active torch"),
        (
            "torhc",
            1,
            "'torhc' is not a provider of this chain; use one of hub, sgl_kernel, flash_attn, torch, reference, fa4, auto. Did you mean 'torch'?",
        ),
    ],
    ids=["valid", "typo"],
)
def test_config_checks_provider_variables_against_declared_chains(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, value: str, code: int, expected: str
) -> None:
    monkeypatch.setenv("KERNEL_FALLBACK_PROVIDER__FLASH_ATTN_VARLEN_FUNC", value)
    got, out, err = run(["config", "--import", "kernel_fallback.integrations.flash_attn"], capsys)
    assert got == code
    assert expected in out + err
    # Chains other tests declared may still be alive: look for the FA ones.
    assert re.search(r"Chains \(\d+ declared in this process\):", out)
    assert "flash_attn_varlen_func: " in out


def test_report_adds_up_counts_across_reset_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "kf.jsonl"
    script = textwrap.dedent(
        """
        import torch, kernel_fallback
        kernel_fallback.configure_logging(format="json", file=__import__("sys").argv[1])
        k = kernel_fallback.tolerant_kwargs(["out"], name="fa3")(lambda x: x * 2)
        for _ in range(100):
            k(torch.ones(1), out=torch.zeros(1))
        kernel_fallback.flush()
        kernel_fallback.reset_stats()
        for _ in range(5):
            k(torch.ones(1), out=torch.zeros(1))
        """
    )
    subprocess.run([sys.executable, "-c", script, str(log)], env=clean_env(), check=True, timeout=120)
    (row,) = report_json([log], capsys)["fallbacks"]
    assert (row["count"], row["exact"], row["processes"]) == (105, True, 1)


# --- text output cannot be forged by a log line -----------------------------------------


HOSTILE_KERNEL = "k\x1b[2J\x1b]0;owned\x07\rfake_kernel  kwarg  out  warn  0\nforged\u202eevil\x85"


@pytest.mark.parametrize("command", ["report", "check"])
def test_control_characters_in_log_fields_are_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = tmp_path / "hostile.jsonl"
    path.write_text(our_event(kernel=HOSTILE_KERNEL, where="w.py:1\x1b[31m", kwarg="o\nut") + "\n")
    code, out, err = run([command, str(path)], capsys)
    assert code == (0 if command == "report" else 1), err
    assert out.isascii()
    assert all(line.isprintable() for line in out.splitlines())
    # One header and one row: a LF or CR in a field cannot add or rewrite rows.
    table = [line for line in out.splitlines() if line.startswith(("KERNEL", "k\\x1b"))]
    assert len(table) == 2
    assert table[1].startswith(
        "k\\x1b[2J\\x1b]0;owned\\x07\\rfake_kernel  kwarg  out  warn  0\\nforged\\u202eevil\\x85  kwarg  o\\nut"
    )
    assert table[1].endswith("w.py:1\\x1b[31m")
    if command == "check":  # the suggestion matches what cannot be shown with `?`
        assert "--allow 'k?[[]2J?[]]0;owned??fake_kernel[ ][ ]kwarg" in out.splitlines()[-1]


# --- start-up: reading logs imports neither torch nor structlog ---------------------------


@pytest.mark.parametrize("command", ["report", "check"])
def test_reading_logs_imports_neither_torch_nor_structlog(logs: list[Path], command: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "kernel_fallback",
            command,
            str(logs[0]),
            "--format",
            "json",
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == (0 if command == "report" else 1), done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "import time:" in line}
    assert "kernel_fallback._logread" in imported  # the measurement saw our imports
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "structlog"))
    assert heavy == []


def test_the_package_imports_its_parts_at_first_use() -> None:
    script = textwrap.dedent(
        """
        import sys
        import kernel_fallback
        assert "torch" not in sys.modules and "structlog" not in sys.modules, "eager import"
        assert sorted(kernel_fallback.__all__) == kernel_fallback.__all__
        assert set(kernel_fallback.__all__) <= set(dir(kernel_fallback))
        from kernel_fallback import PolicyConfigError  # exceptions need no torch
        assert "torch" not in sys.modules
        values = {name: getattr(kernel_fallback, name) for name in kernel_fallback.__all__}
        assert "torch" in sys.modules
        assert kernel_fallback.tolerant_kwargs is values["tolerant_kwargs"]
        from kernel_fallback import kernels, reload_config
        assert kernels is values["kernels"] and reload_config is values["reload_config"]
        try:
            kernel_fallback.tolerant_kwarg
        except AttributeError as exc:
            assert str(exc) == "module 'kernel_fallback' has no attribute 'tolerant_kwarg'", exc
        else:
            raise AssertionError("no AttributeError")
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def test_the_console_script_runs_fast_without_torch(logs: list[Path]) -> None:
    """The installed ``kernel-fallback`` entry point (not only ``python -m``)."""
    script = Path(sys.executable).with_name("kernel-fallback")
    if not script.exists():
        pytest.skip("kernel-fallback is not installed next to this interpreter")
    done = subprocess.run(
        [str(script), "report", *map(str, logs)], env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("KERNEL ")


# --- the suggested allow-list is taken back as printed ----------------------------


@pytest.mark.parametrize(
    "events",
    [
        pytest.param([our_event(kernel="ns::op", kwarg="out")], id="colons"),
        pytest.param([our_event(kernel="attn[fp8]", kwarg="out")], id="fnmatch-class"),
        pytest.param([our_event(kernel="attn*", kwarg="num?splits")], id="wildcards"),
        pytest.param([our_event(kernel="my kernel, v2", kwarg="out")], id="space-comma"),
        pytest.param(
            [our_event(kernel="k", kind="provider", provider="vendor:fa3 [v2]")], id="colon-in-provider"
        ),
        pytest.param([our_event(kernel="[!]]", kwarg="[")], id="brackets"),
        pytest.param([our_event(kernel="k\x1b[31m\tx", kwarg="o\nut")], id="control-characters"),
        pytest.param([our_event(kernel="noyau-é", kwarg="sortie")], id="non-ascii"),
        pytest.param([json.dumps({"event": "kernel_fallback.stats_overflow", "dropped": 3})], id="overflow"),
        pytest.param([our_event(kernel=f"k{i}[{i}]", kwarg=f"a b{i}") for i in range(3)], id="several"),
    ],
)
def test_the_suggested_allow_list_is_accepted_as_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, events: list[str]
) -> None:
    """The patterns `check` prints, read by a POSIX shell, make the same check pass both ways."""
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(events) + "\n")
    code, out, err = run(["check", str(path)], capsys)
    assert code == 1, err
    suggestion = out.splitlines()[-1]
    words = shlex.split(suggestion)  # as the shell splits it when pasted
    option = words[words.index("--allow") + 1]
    (assignment,) = [w for w in words if w.startswith("KERNEL_FALLBACK_ALLOW=")]
    code, _, err = run(["check", str(path), "--allow", option], capsys)
    assert code == 0, err
    monkeypatch.setenv("KERNEL_FALLBACK_ALLOW", assignment.split("=", 1)[1].rstrip("."))
    code, _, err = run(["check", str(path)], capsys)
    assert code == 0, err
    assert "allowed but not seen" not in err


# --- not a regular file, a gzip bomb, huge counts -----------------------------------


def cli_process(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kernel_fallback", *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("command", ["report", "check"])
@pytest.mark.parametrize(
    ("make", "kind"),
    [
        pytest.param(lambda p: os.mkfifo(p), "a FIFO (named pipe)", id="fifo"),
        pytest.param(
            lambda p: os.symlink("/dev/zero", p), "a symbolic link to a character device", id="dev-zero"
        ),
        pytest.param(
            lambda p: os.symlink("/dev/urandom", p), "a symbolic link to a character device", id="dev-urandom"
        ),
    ],
)
def test_a_file_that_is_not_regular_is_refused_at_once(
    tmp_path: Path, command: str, make: Any, kind: str
) -> None:
    """A FIFO or device planted among the logs is named and refused, never waited on or read forever."""
    good = tmp_path / "good.jsonl"
    good.write_text(our_event() + "\n")
    planted = tmp_path / "planted.jsonl"
    make(planted)
    done = cli_process(command, str(good), str(planted), timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"kernel-fallback: error: {planted}: cannot read: it is {kind}; "
        "a log must be a regular file (or - for standard input).\n"
    )
    assert done.stdout == ""


@pytest.mark.skipif(not os.path.exists(os.devnull), reason="needs /dev/null")
def test_dev_null_stays_the_guard_against_an_unmatched_glob(tmp_path: Path) -> None:
    """The documented `logs/* /dev/null`: the null device (also through a link) is read as empty."""
    (tmp_path / "null.jsonl").symlink_to(os.devnull)
    for path in (os.devnull, str(tmp_path / "null.jsonl")):
        done = cli_process("check", "--allow-empty", path)
        assert done.returncode == 0, done.stderr


def test_a_symlink_to_a_regular_log_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "real.jsonl"
    target.write_text(our_event(count=4) + "\n")
    (tmp_path / "link.jsonl").symlink_to(target)
    data = report_json([tmp_path / "link.jsonl"], capsys)
    assert [r["count"] for r in data["fallbacks"]] == [4]


@pytest.mark.parametrize("source", ["file", "stdin"])
@pytest.mark.parametrize(
    "content", [b"\n" * (200 << 20), b"x" * (200 << 20)], ids=["newlines", "one-long-line"]
)
def test_a_gzip_bomb_is_refused_with_exit_2(tmp_path: Path, source: str, content: bytes) -> None:
    """A .gz of 200 KB that expands to 200 MB is refused early, naming it, not read for minutes."""
    bomb = tmp_path / "bomb.jsonl.gz"
    bomb.write_bytes(gzip.compress(our_event().encode() + b"\n" + content, 9))
    assert bomb.stat().st_size < 300_000
    if source == "file":
        done = cli_process("check", str(bomb), timeout=120)
    else:
        with bomb.open("rb") as stdin:
            done = subprocess.run(
                [sys.executable, "-m", "kernel_fallback", "check", "-"],
                stdin=stdin,
                env=clean_env(),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
    assert done.returncode == 2, done.stderr
    shown = str(bomb) if source == "file" else "<stdin>"
    assert done.stderr.startswith(f"kernel-fallback: error: {shown}: cannot read: gzip expands too far (")
    assert "decompression bomb" in done.stderr
    assert done.stdout == ""


def test_a_genuine_gzip_log_is_read_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Many near-identical events, the most a real log compresses, stay under the bound."""
    lines = [our_event(pid=i % 64, timestamp=f"2026-01-01T00:00:{i % 60:02d}Z") for i in range(100_000)]
    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), 9))
    data = report_json([path], capsys)
    assert data["lines"] == 100_000
    assert [r["count"] for r in data["fallbacks"]] == [64]


@pytest.mark.parametrize("field", ["count", "epoch", "pid", "rank", "compiled_traces"])
def test_a_count_beyond_64_bits_is_a_malformed_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    """Two summaries with 4300-digit counts: skipped as malformed, never an internal error."""
    huge = int("9" * 4300)
    path = tmp_path / "huge.jsonl"
    path.write_text(
        "\n".join(
            [our_event(**{"host": h, "pid": 1, field: huge}) for h in "ab"] + [our_event(host="c", pid=1)]
        )
        + "\n"
    )
    for fmt in ("json", "table"):
        code, _, err = run(["report", "--format", fmt, str(path)], capsys)
        assert code == 0, err
        assert "internal error" not in err
        assert "2 malformed line(s) skipped, first at" in err
    data = json.loads(run(["report", "--format", "json", str(path)], capsys)[1])
    assert data["malformed_lines"] == 2
    assert [r["count"] for r in data["fallbacks"]] == [1]


# --- a cut output is never a pass -------------------------------------------------


def many_fallbacks(tmp_path: Path, n: int = 3000) -> Path:
    path = tmp_path / "many.jsonl"
    path.write_text("".join(our_event(kernel=f"kernel_{i}", pid=1) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["check"], 1),  # findings: the finding stands
        (["check", "--allow", "*:*", "--format", "json"], 2),  # a pass that was cut is no pass
        (["report"], 2),
    ],
    ids=["check-denied", "check-allowed-json", "report"],
)
def test_a_reader_that_leaves_early_never_turns_into_a_pass(
    tmp_path: Path, argv: list[str], expected: int, unbuffered: str
) -> None:
    """`kernel-fallback check ... | head -1` under `set -o pipefail`: 1 with findings, else 2."""
    path = many_fallbacks(tmp_path)
    env = clean_env(PYTHONUNBUFFERED=unbuffered)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel_fallback", *argv[:1], str(path), *argv[1:]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    first = proc.stdout.readline()  # what `head -1` does: one line, then leave
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == expected, err
    assert first
    assert "Traceback" not in err
    assert err.endswith(
        f"kernel-fallback: error: could not write to standard output (Broken pipe): the output is "
        f"incomplete, exit status {expected}.\n"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["check", "--allow", "*:*"], 2),  # ok, but its note was lost
        (["check"], 1),
        (["report"], 2),
    ],
    ids=["check-allowed", "check-denied", "report"],
)
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_unwritable_stderr_is_never_a_pass(tmp_path: Path, argv: list[str], expected: int) -> None:
    """`2>/dev/full`: the note on skipped lines cannot be written, so the answer is not a clean pass."""
    path = tmp_path / "cut.jsonl"
    path.write_text(our_event() + "\n" + '{"event": "kernel_fallback.summary", "kern\n')
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "kernel_fallback", *argv[:1], str(path), *argv[1:]],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=full,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == expected
    assert done.stdout  # the answer itself was written


def test_stdout_on_a_full_disk_is_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text(our_event() + "\n")
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "kernel_fallback", "check", str(path), "--allow", "k:*"],
            env=clean_env(),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2
    assert done.stderr == (
        "kernel-fallback: error: could not write to standard output (No space left on device): "
        "the output is incomplete, exit status 2.\n"
    )


@pytest.mark.parametrize(
    ("instances", "processes", "count"),
    [
        (["a1", "b2"], 2, 7),  # one host and pid, two processes (separate PID namespaces)
        ([None, None], 1, 4),  # older logs: host and pid, the latest summary wins
        (["a1", "a1"], 1, 4),
    ],
    ids=["two-instances", "no-instance", "one-instance"],
)
def test_processes_are_told_apart_by_instance_else_by_host_and_pid(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    instances: list[str | None],
    processes: int,
    count: int,
) -> None:
    lines = []
    for instance, n, second in zip(instances, (3, 4), ("01", "02"), strict=True):
        fields: dict[str, Any] = {
            "host": "node",
            "pid": 1,
            "count": n,
            "timestamp": f"2026-01-01T00:00:{second}Z",
        }
        if instance is not None:
            fields["instance"] = instance
        lines.append(our_event(**fields))
    path = tmp_path / "shared.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = report_json([path], capsys)
    assert data["processes"] == processes
    assert [(r["count"], r["processes"]) for r in data["fallbacks"]] == [(count, processes)]
