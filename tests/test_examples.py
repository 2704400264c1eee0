"""The README example and the scripts in examples/ run as documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_readme_example_runs_and_prints_what_it_says() -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None
    assert len(code.group(1).splitlines()) <= 20
    out = run("-c", code.group(1))
    assert out.strip() == "('out', 'sinks') 1"


def test_quickstart_shows_every_policy() -> None:
    out = run("examples/quickstart.py")
    for expected in [
        "result correct: True; caller's buffer still zero: True",
        "returned the caller's buffer: True; buffer correct: True",
        "UnsupportedKwargError: fa3 does not accept the keyword 'sinks'",
        "mm.default missing=['out'] via schema:aten::mm.default; copied: True",
        "fa3_warn now ('copy', 'KERNEL_FALLBACK_ON_DROP__FA3_WARN'): returned buffer: True",
        "PolicyConfigError: KERNEL_FALLBACK_ON_DROP='wran' is not a policy",
        "fa3_warn     out    warn  count=1000",
    ]:
        assert expected in out
    assert out.count("[warning  ] kernel_fallback.kwarg_dropped") == 4


def test_bench_overhead_prints_ratios() -> None:
    out = run("examples/bench_overhead.py", "--rounds", "2", "--calls", "500")
    assert re.search(r"fast path \(accepts out\)\s+\d+\s+\d+\.\d\dx", out)
    assert "retry helper (PR #23717)" in out
    assert "fallbacks counted: " in out


def test_bench_cli_prints_time_and_peak_memory() -> None:
    out = run("examples/bench_cli.py", "--mb", "0.3")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert sorted(rows) == ["(python)", "app-lines", "events", "gzip", "small"]
    assert all(float(row[-1]) > 0 for row in rows.values())  # peak RSS in MB


def test_bench_chain_prints_every_row_with_its_ratio() -> None:
    out = run("examples/bench_chain.py", "--rounds", "1", "--calls", "40")
    for row in ["exact chain ver=3", "torch-like chain", "varlen torch-like chain", "torch chain"]:
        assert re.search(rf"^{re.escape(row)}\s+\d+\s+\d+\.\d\dx", out, re.M), row


def test_bench_decode_host_times_the_providers_host_work_on_cpu() -> None:
    out = run("examples/bench_decode_host.py", "--calls", "20")
    for row in [
        "argument checks (check_cache_args)",
        "mask spec (_spec, memoized)",
        "whole CPU call (SDPA decode)",
    ]:
        assert re.search(rf"^{re.escape(row)}\s+\d+\.\d us/call$", out, re.M), out
