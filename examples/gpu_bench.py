"""GPU cost of tolerant_kwargs, measured side by side with CUDA events in one run.

What it measures (median of many repeats, variants interleaved in each repeat):

1. Fast path vs direct call, eager, on launch-bound decode shapes (batch 1-256,
   32 query heads, 8 KV heads, head dim 128): ``F.scaled_dot_product_attention``
   wrapped with ``drop=["out"]`` and called without ``out``, ``torch.mm(out=)``
   wrapped (it accepts ``out``: passed through), and the FlashAttention chain's
   ``flash_attn_with_kvcache`` served by its torch provider vs calling that provider
   directly. Target: <= 1.05x.
2. ``copy`` vs a native ``out`` kernel on bandwidth-bound and prefill shapes: the
   extra time, the bandwidth it implies (bytes read + written by the copy), and that
   bandwidth as a share of a device-to-device copy measured in the same run.
   Target: >= 80%.
3. Peak memory of ``copy`` vs native (``torch.cuda.max_memory_allocated``).

Run on any CUDA machine: ``python examples/gpu_bench.py [--json FILE] [--markdown FILE]``.
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kernel_fallback import tolerant_kwargs

Variant = Callable[[], Any]


def cuda_ms(variants: dict[str, Variant], iters: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each variant; variants interleaved per repeat."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up: allocator, cuBLAS handles, Triton JIT
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    for _ in range(repeats):
        for name, fn in variants.items():
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / iters)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_bytes(fn: Variant) -> int:
    """Peak memory allocated while ``fn`` runs, above what was allocated before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bf16(*shape: int) -> torch.Tensor:
    """Random bfloat16 data on the GPU (never zeros: timings must see real values)."""
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def environment() -> dict[str, str]:
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        driver = "unknown"
    try:
        import triton

        triton_version = str(triton.__version__)
    except ImportError:
        triton_version = "not installed"
    return {
        "triton": triton_version,
        "gpu": torch.cuda.get_device_name(),
        "driver": driver,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
    }


def fast_path(rows: list[dict[str, Any]], repeats: int) -> None:
    sdpa = tolerant_kwargs(["out"], "copy", name="sdpa")(F.scaled_dot_product_attention)
    mm = tolerant_kwargs(["out"], "raise")(torch.mm)
    from kernel_fallback.integrations.flash_attn import _fast as provider
    from kernel_fallback.integrations.flash_attn import flash_attn_with_kvcache as chain_kvcache

    chain_kvcache.use("torch")  # the torch provider, through the whole chain
    for batch in (1, 8, 64, 256):
        q = bf16(batch, 32, 1, 128)
        k = bf16(batch, 8, 1024, 128)
        v = torch.randn_like(k)
        ms = cuda_ms(
            {
                "direct": partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True),
                "decorated": partial(sdpa, q, k, v, enable_gqa=True),
            },
            iters=200,
            repeats=repeats,
        )
        rows.append({"kernel": "sdpa decode (kv 1024)", "batch": batch, **ms})
        a = bf16(batch, 4096)
        w = bf16(4096, 128)
        o = torch.empty(batch, 128, device="cuda", dtype=torch.bfloat16)
        ms = cuda_ms(
            {"direct": partial(torch.mm, a, w, out=o), "decorated": partial(mm, a, w, out=o)},
            iters=200,
            repeats=repeats,
        )
        rows.append({"kernel": "torch.mm(out=) decode", "batch": batch, **ms})
    for batch in (1, 8):
        qc = bf16(batch, 1, 32, 128)
        kc = bf16(batch, 1024, 8, 128)
        vc = torch.randn_like(kc)
        ms = cuda_ms(
            {
                "direct": partial(provider.flash_attn_with_kvcache, qc, kc, vc),
                "decorated": partial(chain_kvcache, qc, kc, vc),
            },
            iters=50,
            repeats=max(5, repeats // 2),
        )
        rows.append({"kernel": "FA chain (torch provider) flash_attn_with_kvcache", "batch": batch, **ms})
    for row in rows:
        row["ratio"] = row["decorated"] / row["direct"]


def copy_cases() -> list[tuple[str, Variant, Variant, torch.Tensor]]:
    """(name, native call, copy-policy call, the out buffer) for each measured case."""
    mm_copy = tolerant_kwargs(["out"], "copy", name="mm_copy")(torch.ops.aten.mm.default)
    sdpa_copy = tolerant_kwargs(["out"], "copy", name="sdpa_copy")(F.scaled_dot_product_attention)
    cases: list[tuple[str, Variant, Variant, torch.Tensor]] = []
    for tokens in (4096, 16384, 32768):
        a = bf16(tokens, 4096)
        w = bf16(4096, 4096)
        out = torch.empty(tokens, 4096, device="cuda", dtype=torch.bfloat16)
        name = f"mm prefill {tokens}x4096x4096"
        cases.append((name, partial(torch.mm, a, w, out=out), partial(mm_copy, a, w, out=out), out))
    for tokens in (4096, 16384, 32768):
        q = bf16(1, 32, tokens, 128)
        k = bf16(1, 8, tokens, 128)
        v = torch.randn_like(k)
        out = torch.empty_like(q)
        # SDPA has no out=: the fairest native path is the kernel with no copy at all.
        native = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
        copy = partial(sdpa_copy, q, k, v, is_causal=True, enable_gqa=True, out=out)
        cases.append((f"sdpa prefill causal {tokens} tok", native, copy, out))
    try:
        import triton_kernels  # examples/triton_kernels.py
    except ImportError as exc:
        print(f"triton cases skipped: {exc}", file=sys.stderr)
        return cases
    tri_copy = tolerant_kwargs(["out"], "copy", name="triton_copy")(triton_kernels.scaled_add)
    for n in (1 << 24, 1 << 27):
        x, y = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
        out = torch.empty(n, device="cuda")
        native = partial(triton_kernels.scaled_add_out, x, y, 2.0, out=out)
        cases.append(
            (f"triton scaled_add {n >> 20}M fp32", native, partial(tri_copy, x, y, 2.0, out=out), out)
        )
    return cases


def copy_cost(rows: list[dict[str, Any]], repeats: int) -> None:
    for name, native, copy, out in copy_cases():
        src = torch.empty_like(out)
        ms = cuda_ms(
            {"native": native, "copy": copy, "d2d copy": partial(out.copy_, src)},
            iters=10,
            repeats=repeats,
        )
        nbytes = out.numel() * out.element_size()
        extra = ms["copy"] - ms["native"]
        d2d_gbs = 2 * nbytes / (ms["d2d copy"] * 1e6)
        implied_gbs = 2 * nbytes / (extra * 1e6) if extra > 0 else float("inf")
        rows.append(
            {
                "case": name,
                "native_ms": ms["native"],
                "copy_ms": ms["copy"],
                "extra_ms": extra,
                "out_mib": nbytes / 2**20,
                "d2d_gbs": d2d_gbs,
                "extra_as_copy_gbs": implied_gbs,
                "share_of_d2d": implied_gbs / d2d_gbs,
                "peak_native_mib": peak_bytes(native) / 2**20,
                "peak_copy_mib": peak_bytes(copy) / 2**20,
            }
        )


def markdown(env: dict[str, str], fast: list[dict[str, Any]], copy: list[dict[str, Any]]) -> str:
    lines = [
        f"Measured on {env['gpu']}, driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']}, "
        f"Triton {env['triton']}, Python {env['python']}.",
        "",
        "| fast path (eager) | batch | direct ms | decorated ms | ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['kernel']} | {r['batch']} | {r['direct']:.4f} | {r['decorated']:.4f} | {r['ratio']:.3f}x |"
        for r in fast
    ]
    lines += [
        "",
        "| copy vs native | native ms | copy ms | extra ms | out MiB | extra as copy GB/s | d2d GB/s "
        "| share | peak native MiB | peak copy MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['case']} | {r['native_ms']:.3f} | {r['copy_ms']:.3f} | {r['extra_ms']:.3f} | "
        f"{r['out_mib']:.0f} | {r['extra_as_copy_gbs']:.0f} | {r['d2d_gbs']:.0f} | {r['share_of_d2d']:.0%} | "
        f"{r['peak_native_mib']:.0f} | {r['peak_copy_mib']:.0f} |"
        for r in copy
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write the measurements as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the tables as Markdown here")
    parser.add_argument(
        "--only", choices=("fast", "copy", "attention"), help="measure one part only (default: all)"
    )
    parser.add_argument(
        "--sections",
        default="prefill,decode,mla,fp8",
        help="attention sections to measure, comma-separated (prefill, decode, mla, fp8)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; nothing to measure.")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    logging.getLogger("kernel_fallback").setLevel(logging.ERROR)  # the one warning is not timed
    env = environment()
    fast: list[dict[str, Any]] = []
    copy: list[dict[str, Any]] = []
    attention: list[dict[str, Any]] = []
    if args.only in (None, "fast"):
        fast_path(fast, args.repeats)
    if args.only in (None, "copy"):
        copy_cost(copy, args.repeats)
    table = markdown(env, fast, copy)
    if args.only in (None, "attention"):
        import attention_bench

        sections = tuple(s for s in args.sections.split(",") if s)
        unknown = sorted(set(sections) - set(attention_bench.SECTIONS))
        if unknown:
            parser.error(f"--sections: unknown {unknown}; choose from {', '.join(attention_bench.SECTIONS)}")
        for section in sections:  # tables written after each section: a cut run keeps what it measured
            attention_bench.run((section,), attention, cuda_ms, args.repeats)
            print(attention_bench.markdown(attention), flush=True)
            _write(args, table + "\n" + attention_bench.markdown(attention), env, fast, copy, attention)
        table += "\n" + attention_bench.markdown(attention)
    print(table)
    _write(args, table, env, fast, copy, attention)
    return 0


def _write(
    args: argparse.Namespace,
    table: str,
    env: dict[str, str],
    fast: list[dict[str, Any]],
    copy: list[dict[str, Any]],
    attention: list[dict[str, Any]],
) -> None:
    if args.json:
        record = {"environment": env, "fast_path": fast, "copy": copy, "attention": attention}
        args.json.write_text(json.dumps(record, indent=2))
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    raise SystemExit(main())
