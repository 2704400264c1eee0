"""``kernel-fallback config``: every variable a declared kernel or chain reads is checked,
and the config process writes no events, in real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from child_env import clean_env

from kernel_fallback import PolicyConfigError

WORKLOAD = Path(__file__).with_name("fallback_workload.py")
FLASH_ATTN = "kernel_fallback.integrations.flash_attn"


def config(*args: str, cwd: Path | str = ".", **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m kernel_fallback config ARGS`` in its own process, with ``env`` set."""
    return subprocess.run(
        [sys.executable, "-m", "kernel_fallback", "config", *args],
        env=clean_env(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_invalid_variable_a_chain_reads_fails_config(fmt: str) -> None:
    done = config("--import", FLASH_ATTN, "--format", fmt, SGLANG_USE_SGL_FA3_KERNEL="maybe")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0] == (
        "kernel-fallback: invalid variable SGLANG_USE_SGL_FA3_KERNEL: SGLANG_USE_SGL_FA3_KERNEL='maybe' "
        "is not a boolean; use one of true, false, 1, 0, yes, no, on, off (any case)."
    )
    if fmt == "json":
        data = json.loads(done.stdout)
        assert data["ok"] is False
        (row,) = [v for v in data["variables"] if v["name"] == "SGLANG_USE_SGL_FA3_KERNEL"]
        assert (row["value"], row["status"]) == ("maybe", "invalid")
    else:
        assert "SGLANG_USE_SGL_FA3_KERNEL  = 'maybe'  [invalid]" in done.stdout


def test_a_valid_chain_variable_passes() -> None:
    done = config("--import", FLASH_ATTN, "--format", "json", SGLANG_USE_SGL_FA3_KERNEL="false")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory with a module declaring kernel ``cli_attn``."""
    (tmp_path / "my_kernels.py").write_text(
        textwrap.dedent(
            """
            from kernel_fallback import tolerant_kwargs

            @tolerant_kwargs(drop={"out": None, "num_splits": 1}, name="cli_attn")
            def cli_attn(q):
                return q
            """
        )
    )
    (tmp_path / "broken_kernels.py").write_text("raise RuntimeError('no GPU\\x1b[31m here')\n")
    return tmp_path


@pytest.mark.parametrize(
    "name",
    [
        "KERNEL_FALLBACK_ON_DROP__cli_attn",
        "KERNEL_FALLBACK_ON_DROP__CLI_ATN",
        "KERNEL_FALLBACK_ON_DROP___CLI_ATTN",
    ],
    ids=["lower-case", "misspelt", "extra-underscore"],
)
def test_a_per_kernel_variable_close_to_a_declared_kernel_fails_config(project: Path, name: str) -> None:
    done = config("--import", "my_kernels", cwd=project, **{name: "raise"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"kernel-fallback: invalid variable {name}: " in done.stderr
    assert "Did you mean 'KERNEL_FALLBACK_ON_DROP__CLI_ATTN' (kernel 'cli_attn')?" in done.stderr


def test_a_module_that_fails_to_import_is_one_line_exit_2(project: Path) -> None:
    done = config("--import", "broken_kernels", cwd=project)
    assert done.returncode == 2
    assert done.stderr == (
        "kernel-fallback: error: --import broken_kernels: importing it raised RuntimeError: no GPU\\x1b[31m here\n"
    )


def test_config_writes_no_events_into_the_log_file_check_reads(tmp_path: Path) -> None:
    """`config --import` then the workload, both with the launcher's log variables:
    `check logs/*` judges the workload alone."""
    logs = tmp_path / "logs"
    env = {"KERNEL_FALLBACK_LOG_FORMAT": "json", "KERNEL_FALLBACK_LOG_FILE": str(logs / "kf-{pid}.jsonl")}
    # Loading the flash_attn chain on this machine falls back (no sgl_kernel): events.
    shown = config("--import", FLASH_ATTN, **env)
    assert shown.returncode == 0, shown.stderr
    assert "active torch" in shown.stdout
    assert not logs.exists() or list(logs.iterdir()) == []
    subprocess.run(
        [sys.executable, str(WORKLOAD), "--add", "3"], env=clean_env(**env), check=True, timeout=120
    )
    (log,) = logs.iterdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernel_fallback",
            "check",
            "--format",
            "json",
            str(log),
            "--allow",
            "toy_add:out",
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert (data["processes"], [r["kernel"] for r in data["allowed"]]) == (1, ["toy_add"])


@pytest.mark.parametrize(
    "name",
    [
        "KERNEL_FALLBACK_PROVIDER__flash_attn_varlen_func",
        "KERNEL_FALLBACK_PROVIDER__FLASH_ATTN_VARLN_FUNC",
    ],
    ids=["lower-case", "misspelt"],
)
def test_a_provider_variable_close_to_a_declared_chain_fails_config(name: str) -> None:
    done = config("--import", FLASH_ATTN, **{name: "torch"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert name in done.stderr
    assert "Did you mean 'KERNEL_FALLBACK_PROVIDER__FLASH_ATTN_VARLEN_FUNC'" in done.stderr


@pytest.mark.parametrize(
    ("value", "code", "status"),
    [("0", 0, "ok"), ("On", 0, "ok"), (" ", 0, "ok"), ("maybe", 1, "invalid")],
    ids=["off", "on-any-case", "blank", "not-a-boolean"],
)
def test_every_variable_a_module_reads_is_checked_by_its_readers_parser(
    value: str, code: int, status: str
) -> None:
    # KERNEL_FALLBACK_TRITON is read by the flash_attn integration, not by the core.
    done = config("--format", "json", KERNEL_FALLBACK_TRITON=value)
    assert done.returncode == code, done.stderr
    (row,) = [v for v in json.loads(done.stdout)["variables"] if v["name"] == "KERNEL_FALLBACK_TRITON"]
    assert row["status"] == status, row
    if status == "invalid":
        from kernel_fallback.integrations.flash_attn._fast import triton_decode_enabled

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KERNEL_FALLBACK_TRITON", value)
            with pytest.raises(PolicyConfigError) as info:
                triton_decode_enabled()
        assert row["message"] == str(info.value), "config and the reader must say the same"


_PLANTED = """
import pathlib
pathlib.Path(__file__).with_name("EXECUTED").write_text("a flash_attn.py in the working directory ran")
"""


@pytest.mark.parametrize(
    ("how", "executed"),
    [
        ("console-script", False),
        ("console-script-safe-path", False),
        ("python-m-safe-path", False),
        ("pythonpath-names-it", True),
    ],
    ids=["console-script", "console-script-safe-path", "python-m-safe-path", "pythonpath-names-it"],
)
def test_providers_do_not_import_a_module_of_the_working_directory(
    tmp_path: Path, how: str, executed: bool
) -> None:
    # `import flash_attn` (the flash_attn provider's loader) must not run a file of that
    # name that happens to sit in the directory config runs in, unless the user's own
    # sys.path holds that directory (PYTHONPATH here: a positive control).
    (tmp_path / "flash_attn.py").write_text(_PLANTED)
    script = Path(sys.executable).with_name("kernel-fallback")
    command = (
        [str(script)]
        if how.startswith("console") or how.startswith("pythonpath")
        else [
            sys.executable,
            "-m",
            "kernel_fallback",
        ]
    )
    env = {"PYTHONSAFEPATH": "1"} if how.endswith("safe-path") else {}
    if how == "pythonpath-names-it":
        env["PYTHONPATH"] = str(tmp_path)
    done = subprocess.run(
        [*command, "config", "--import", FLASH_ATTN, "--format", "json"],
        env=clean_env(**env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "EXECUTED").exists() is executed


def test_the_projects_own_module_is_still_imported_from_the_working_directory(project: Path) -> None:
    script = Path(sys.executable).with_name("kernel-fallback")
    done = subprocess.run(
        [str(script), "config", "--import", "my_kernels", "--format", "json"],
        env=clean_env(),
        cwd=project,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [k["kernel"] for k in json.loads(done.stdout)["kernels"]] == ["cli_attn"]
