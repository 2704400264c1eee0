"""A workload for the monitoring tests, run in real subprocesses.

Calls decorated torch kernels that lack a keyword the caller passes, so every call
is a fallback. Logging is set up through the environment
(KERNEL_FALLBACK_LOG_FORMAT / KERNEL_FALLBACK_LOG_FILE), as a launcher would, or
with ``--configure-file PATH`` through ``configure_logging(file=PATH)``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os

import torch

import kernel_fallback


@kernel_fallback.tolerant_kwargs(drop=["out"], on_drop="copy", name="toy_add")
def toy_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """An add kernel built without an ``out`` parameter."""
    return torch.add(x, y)


@kernel_fallback.tolerant_kwargs(drop={"num_splits": 1}, on_drop="warn", name="toy_attn")
def toy_attn(q: torch.Tensor) -> torch.Tensor:
    """A kernel that lacks the speed-only ``num_splits`` knob."""
    return q * 2


def add_calls(n: int) -> None:
    """``n`` calls of toy_add with an ``out`` buffer: ``n`` copy fallbacks."""
    x, y, out = torch.ones(4), torch.ones(4), torch.empty(4)
    for _ in range(n):
        toy_add(x, y, out=out)
    assert torch.equal(out, torch.full((4,), 2.0))


def main() -> None:
    """Run the calls the command line asks for."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--add", type=int, default=0, help="toy_add calls with out=")
    parser.add_argument("--attn", type=int, default=0, help="toy_attn calls with num_splits=4")
    parser.add_argument("--fork-child", type=int, default=0, help="toy_add calls in a forked child")
    parser.add_argument("--killed", action="store_true", help="end with os._exit: no summary")
    parser.add_argument("--configure-file", help="call configure_logging(file=...) with this path first")
    args = parser.parse_args()
    if args.configure_file:
        kernel_fallback.configure_logging(file=args.configure_file)
    add_calls(args.add)
    for _ in range(args.attn):
        toy_attn(torch.ones(2), num_splits=4)
    if args.fork_child:
        child = multiprocessing.get_context("fork").Process(target=add_calls, args=(args.fork_child,))
        child.start()
        child.join()
        assert child.exitcode == 0, child.exitcode
    if args.killed:
        os._exit(0)


if __name__ == "__main__":
    main()
