"""Per-call cost of tolerant_kwargs against a direct call, measured side by side.

Prints nanoseconds per call (median of several rounds, rounds interleaved so that
machine noise hits every variant alike) for:

- ``direct``: the kernel called as it is;
- ``fast path``: decorated, the kernel accepts the listed keyword (``torch.add`` with ``out=``),
  against ``torch.add(..., out=)`` called directly;
- ``fallback warn`` / ``fallback copy``: decorated, the kernel lacks ``out`` (an sgl-kernel
  style Python entry point), the call passes ``out=``;
- ``retry helper``: the try/except-and-retry helper of sglang PR #23717, which pays
  an exception on every call.

Run: ``make bench`` or ``python examples/bench_overhead.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from kernel_fallback import reset_stats, stats, tolerant_kwargs


def kernel_without_out(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """An entry point of a kernel build that has no ``out`` (like sgl-kernel's FA3)."""
    return torch.add(x, y, alpha=alpha)


def retry_on_type_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The helper from the PR: try, match the message, retry without ``out``."""
    try:
        return fn(*args, **kwargs)
    except TypeError as exc:
        if "unexpected keyword argument 'out'" in str(exc) and "out" in kwargs:
            kwargs.pop("out")
            return fn(*args, **kwargs)
        raise


def time_per_call(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=16, help="elements per tensor")
    args = parser.parse_args()
    # The single fallback warning must not be what we time.
    logging.getLogger("kernel_fallback").setLevel(logging.ERROR)
    torch.set_num_threads(1)

    x, y, buf = torch.randn(args.size), torch.randn(args.size), torch.empty(args.size)
    add_tolerant = tolerant_kwargs(["out"])(torch.add)
    warn = tolerant_kwargs(["out"], "warn")(kernel_without_out)
    copy = tolerant_kwargs(["out"], "copy", name="kernel_without_out_copy")(kernel_without_out)

    variants: dict[str, Callable[[], Any]] = {
        "direct torch.add(out=)": lambda: torch.add(x, y, out=buf),
        "fast path (accepts out)": lambda: add_tolerant(x, y, out=buf),
        "direct kernel (no out)": lambda: kernel_without_out(x, y),
        "fallback warn": lambda: warn(x, y, out=buf),
        "fallback copy": lambda: copy(x, y, out=buf),
        "direct kernel + copy_": lambda: buf.copy_(kernel_without_out(x, y)),
        "retry helper (PR #23717)": lambda: retry_on_type_error(kernel_without_out, x, y, out=buf),
    }
    reset_stats()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        time_per_call(fn, 1000)  # warm up
    for _ in range(args.rounds):
        for name, fn in variants.items():
            samples[name].append(time_per_call(fn, args.calls))
    ns = {name: statistics.median(values) for name, values in samples.items()}

    print(
        f"torch {torch.__version__}, {args.size}-element float32 tensors, 1 thread, "
        f"median of {args.rounds} rounds x {args.calls} calls"
    )
    print(f"{'variant':<28} {'ns/call':>9}  ratio")
    ratios = {
        "direct torch.add(out=)": ("direct torch.add(out=)", None),
        "fast path (accepts out)": ("direct torch.add(out=)", 1.25),
        "direct kernel (no out)": ("direct kernel (no out)", None),
        "fallback warn": ("direct kernel (no out)", 2.5),
        "fallback copy": ("direct kernel + copy_", 2.5),
        "direct kernel + copy_": ("direct kernel + copy_", None),
        "retry helper (PR #23717)": ("direct kernel (no out)", None),
    }
    for name, (base, target) in ratios.items():
        ratio = ns[name] / ns[base]
        note = (
            f"  (vs {base}; target <= {target}x: {'met' if ratio <= target else 'MISSED'})" if target else ""
        )
        print(f"{name:<28} {ns[name]:9.0f}  {ratio:5.2f}x{note}")
    counted = sum(row["count"] for row in stats())
    print(f"fallbacks counted: {counted} (every call of the two fallback variants)")


if __name__ == "__main__":
    main()
