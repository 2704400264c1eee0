"""Quickstart: every policy of tolerant_kwargs on real torch kernels, with the events it logs.

Run: ``make demo`` (or ``python examples/quickstart.py``). The events are printed by
structlog's console renderer; in a real application they go wherever your logging
set-up sends them.
"""

from __future__ import annotations

import os

import structlog
import torch

import kernel_fallback
from kernel_fallback import UnsupportedKwargError, reload_config, stats, tolerant_kwargs


# An FA3 entry point from a kernel build that has no `out` (like sgl-kernel 0.3.21).
def flash_attn_varlen_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float = 0.0
) -> torch.Tensor:
    """Attention over (heads, tokens, dim) tensors."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def section(title: str) -> None:
    print(f"\n== {title}")


def main() -> None:
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(colors=False)]
    )
    q, k, v = (torch.randn(4, 16, 64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)

    section("warn: out= is dropped, the kernel's own result is returned, one warning for 1000 calls")
    fa3_warn = tolerant_kwargs(["out"], "warn", name="fa3_warn")(flash_attn_varlen_func)
    buf = torch.zeros_like(q)
    for _ in range(1000):
        result = fa3_warn(q, k, v, out=buf)
    still_zero = bool((buf == 0).all())
    print(f"result correct: {torch.allclose(result, expected)}; caller's buffer still zero: {still_zero}")

    section("copy: out= keeps its meaning, the result is copied into the caller's buffer")
    fa3_copy = tolerant_kwargs(["out"], "copy", name="fa3_copy")(flash_attn_varlen_func)
    buf = torch.zeros_like(q)
    result = fa3_copy(q, k, v, out=buf)
    print(f"returned the caller's buffer: {result is buf}; buffer correct: {torch.allclose(buf, expected)}")

    section("neutral values are dropped silently: out=None")
    fa3_copy(q, k, v, out=None)
    print("no event for out=None")

    section("raise: a keyword that changes results must not be dropped")
    fa3_sinks = tolerant_kwargs({"out": None, "sinks": None}, {"out": "copy", "sinks": "raise"}, name="fa3")(
        flash_attn_varlen_func
    )
    try:
        fa3_sinks(q, k, v, sinks=torch.zeros(4))
    except UnsupportedKwargError as exc:
        print(f"UnsupportedKwargError: {exc}")

    section("torch ops: the schema says what is missing (they raise RuntimeError, not TypeError)")
    mm = tolerant_kwargs(["out"], "copy")(torch.ops.aten.mm.default)
    a, b, out = torch.randn(8, 16), torch.randn(16, 4), torch.empty(8, 4)
    print(
        f"mm.default missing={list(mm.tolerant.missing)} via {mm.tolerant.support.source}; "
        f"copied: {mm(a, b, out=out) is out and torch.allclose(out, a @ b)}"
    )
    add = tolerant_kwargs(["out"], "raise")(torch.add)
    print(f"torch.add accepts out: missing={list(add.tolerant.missing)} -> passed through untouched")

    section("operators change policy without editing code: KERNEL_FALLBACK_ON_DROP__FA3_WARN=copy")
    os.environ["KERNEL_FALLBACK_ON_DROP__FA3_WARN"] = "copy"
    reload_config()
    buf = torch.zeros_like(q)
    returned = fa3_warn(q, k, v, out=buf)
    print(f"fa3_warn now {fa3_warn.tolerant.policies['out']}: returned buffer: {returned is buf}")

    section("strict mode for CI: KERNEL_FALLBACK_STRICT=1 makes every real drop an error")
    os.environ["KERNEL_FALLBACK_STRICT"] = "1"
    reload_config()
    try:
        fa3_copy(q, k, v, out=torch.zeros_like(q))
    except UnsupportedKwargError as exc:
        print(f"UnsupportedKwargError: {str(exc)[:90]}...")

    section("a typo is an error, never a default: KERNEL_FALLBACK_ON_DROP=wran")
    os.environ["KERNEL_FALLBACK_ON_DROP"] = "wran"
    try:
        reload_config()
    except kernel_fallback.PolicyConfigError as exc:
        print(f"PolicyConfigError: {exc}")
    del os.environ["KERNEL_FALLBACK_ON_DROP"], os.environ["KERNEL_FALLBACK_STRICT"]
    reload_config()

    section("exact counts (stats()), whatever was logged")
    for row in stats():
        print(f"  {row['kernel']:<12} {row['kwarg']:<6} {row['policy']:<5} count={row['count']}")


if __name__ == "__main__":
    main()
