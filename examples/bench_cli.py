"""Time and peak memory of ``kernel-fallback report`` on generated logs.

Writes JSON-lines logs of the given size in three shapes and runs the real command
(``python -m kernel_fallback report``) on each in a child process, reading the
child's own peak RSS from ``os.wait4``:

- ``small``: a handful of events (start-up cost: the command imports neither torch
  nor structlog);
- ``app-lines``: a serving log where most lines are the application's own, with
  first-occurrence events and summaries of 64 ranks mixed in;
- ``events``: nothing but our events of 64 ranks that ``flush()`` every few seconds
  (long-running processes), ending in a line cut short by a kill;
- ``gzip``: the ``events`` log compressed.

The baseline row runs ``python -c pass`` for the interpreter's own start and memory.
Peak RSS that stays flat as the file grows is what "streamed in bounded memory" means.

Run: ``python examples/bench_cli.py [--mb 100] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KERNELS = ("fa3_varlen", "fa3_kvcache", "sgl_rmsnorm", "moe_align")
RANKS = 64


def _event(rng: random.Random, rank: int, summary: bool, second: int) -> str:
    kernel = rng.choice(KERNELS)
    fields: dict[str, object] = {
        "timestamp": f"2026-11-25T18:{second // 60 % 60:02d}:{second % 60:02d}.{rng.randrange(10**6):06d}Z",
        "level": "warning",
        "event": "kernel_fallback.summary" if summary else "kernel_fallback.kwarg_dropped",
        "kernel": kernel,
        "kwarg": "out",
        "policy": "copy",
        "source": "decorator",
        "reason": f"{kernel} does not accept 'out' (signature)",
        "where": "/srv/app/model_runner.py:412",
        "pid": 40000 + rank,
        "host": f"node{rank // 8}",
        "rank": rank,
    }
    if summary:
        fields.update(kind="kwarg", count=second * 10, compiled_traces=0, graph_captures=0)
    return json.dumps(fields)


def write_log(path: Path, megabytes: float, shape: str, seed: int = 0) -> None:
    """A log of about ``megabytes`` MB in ``shape`` (small, app-lines, events)."""
    rng = random.Random(seed)
    limit = int(megabytes * 1e6)
    written = second = 0
    with path.open("w") as f:
        while written < limit:
            second += 1
            rank = rng.randrange(RANKS)
            if shape == "app-lines" and rng.random() < 0.9:
                line = (
                    f"2026-11-25 18:33:{second % 60:02d} INFO [rank {rank}] request {second} done "
                    f"in {rng.random():.3f}s tokens={rng.randrange(4096)}"
                )
            else:
                line = _event(rng, rank, summary=rng.random() < 0.9, second=second)
            f.write(line + "\n")
            written += len(line) + 1
        if shape == "events":
            f.write(_event(rng, 0, summary=True, second=second)[:57])  # killed mid-write


def measure(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of the command ``argv``, run as a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{argv} exited {proc.returncode}: {err}")
    # ru_maxrss is in KiB on Linux.
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="size of the large logs (MB)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write them (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        logs = {"small": directory / "small.jsonl"}
        write_log(logs["small"], 0.002, "events")
        for shape in ("app-lines", "events"):
            logs[shape] = directory / f"{shape}.jsonl"
            write_log(logs[shape], args.mb, shape)
        logs["gzip"] = directory / "events.jsonl.gz"
        with logs["events"].open("rb") as src, gzip.open(logs["gzip"], "wb", compresslevel=1) as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        base_time, base_rss = measure([sys.executable, "-c", "pass"])
        print(f"{'log':<12} {'size MB':>8} {'seconds':>8} {'MB/s':>7} {'peak RSS MB':>12}")
        print(f"{'(python)':<12} {0:>8.1f} {base_time:>8.2f} {'':>7} {base_rss:>12.1f}")
        for name, path in logs.items():
            size = path.stat().st_size / 1e6
            seconds, rss = measure([sys.executable, "-m", "kernel_fallback", "report", str(path)])
            print(f"{name:<12} {size:>8.1f} {seconds:>8.2f} {size / seconds:>7.1f} {rss:>12.1f}")


if __name__ == "__main__":
    main()
