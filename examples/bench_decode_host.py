"""Host cost of an eager decode call, and the Triton decode kernel's speed (MLA, fp8).

On CUDA, per decode shape (bf16, 32/8 heads, d=128, paged cache):

* ``eager us/call``: wall time of N eager calls and one synchronize, divided by N;
* ``issue us/call``: the same without waiting for the GPU (the host's share: what a
  serving loop without CUDA graphs pays per layer);
* ``kernel us``: the GPU time of one call, from CUDA-graph replay timed with CUDA events;
* ``host us``: ``eager - kernel`` where the call is host-bound.

Rows: the torch provider (``_fast.flash_attn_with_kvcache``), the public chain entry
point, ``decode_attention`` itself, ``decode_attention`` through ``JITFunction.run``
every call (its plan cache cleared: the launch path before plans existed), and SDPA
over a contiguous cache (``enable_gqa``).

``--kernels`` adds CUDA-graph replay timings of MLA decode (rope 64 + latent 512, one kv
head, views of one buffer, as sglang calls FA3) with bandwidth counting the latent and
rope bytes read once, and of fp8 e4m3 vs bf16 decode of the same shape. ``--sweep``
tries split-kernel tile configs on the MLA shapes.

Without CUDA it times what runs on CPU: the provider's argument checks and a CPU call.
Run: ``python examples/bench_decode_host.py [--calls N] [--kernels] [--sweep]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import attention_bench  # examples/, beside this script
import torch
import torch.nn.functional as F

from kernel_fallback.integrations import flash_attn as chain
from kernel_fallback.integrations.flash_attn import _fast as fast

Fn = Callable[[], Any]


def host_us(fn: Fn, calls: int, rounds: int = 5) -> tuple[float, float]:
    """Median (issue, eager) microseconds per call over ``rounds`` runs of ``calls`` calls."""
    for _ in range(3):
        fn()
    cuda = torch.cuda.is_available()
    issue, eager = [], []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        issue.append((t1 - t0) / calls * 1e6)
        eager.append((t2 - t0) / calls * 1e6)
    return statistics.median(issue), statistics.median(eager)


def graph_us(fn: Fn, per_graph: int = 20, replays: int = 10) -> float:
    """GPU microseconds per call: ``per_graph`` calls captured in one CUDA graph, replayed."""
    return 1e3 * attention_bench.graph_ms(fn, calls=per_graph, repeats=replays)


def paged(batch: int, tokens: int, page: int, hkv: int, d: int, dtype: torch.dtype) -> dict[str, Any]:
    """A paged cache holding ``tokens`` keys for each of ``batch`` sequences, pages shuffled."""
    per_seq = tokens // page
    blocks = batch * per_seq
    k = torch.randn(blocks, page, hkv, d, device="cuda").to(dtype)
    v = torch.randn(blocks, page, hkv, d, device="cuda").to(dtype)
    table = torch.randperm(blocks, device="cuda").view(batch, per_seq).int()
    lens = torch.full((batch,), tokens, dtype=torch.int32, device="cuda")
    return {"k": k, "v": v, "page_table": table, "lens": lens}


def host_section(calls: int) -> None:
    from kernel_fallback.integrations.flash_attn import _triton_decode as td
    from kernel_fallback.integrations.flash_attn import _triton_plan as plans

    print(f"# eager decode, bf16 32/8 heads d=128, page 64 ({torch.cuda.get_device_name()})")
    print(f"{'shape':<12}{'path':<34}{'issue us':>10}{'eager us':>10}{'kernel us':>10}{'host us':>9}")
    for batch, tokens in ((1, 4096), (8, 4096), (64, 4096)):
        c = paged(batch, tokens, 64, 8, 128, torch.bfloat16)
        q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        kwargs = {"cache_seqlens": c["lens"], "page_table": c["page_table"], "causal": True}
        k_flat = c["k"][c["page_table"].long()].flatten(1, 2).transpose(1, 2).contiguous()
        v_flat = c["v"][c["page_table"].long()].flatten(1, 2).transpose(1, 2).contiguous()
        q_sdpa = q.transpose(1, 2)

        def direct(c: dict[str, Any] = c, q: torch.Tensor = q) -> Any:
            return td.decode_attention(
                q, c["k"], c["v"], c["lens"], c["page_table"], 128**-0.5, (-1, 0), 0.0, None, False
            )

        def through_jit(direct: Fn = direct) -> Any:
            plans._PLANS.clear()
            return direct()

        paths: dict[str, Fn] = {
            "provider (_fast)": partial(fast.flash_attn_with_kvcache, q, c["k"], c["v"], **kwargs),
            "chain flash_attn_with_kvcache": partial(
                chain.flash_attn_with_kvcache, q, c["k"], c["v"], **kwargs
            ),
            "decode_attention (plan, direct)": direct,
            "decode_attention (JITFunction.run)": through_jit,
            "sdpa eager (contiguous cache)": partial(
                F.scaled_dot_product_attention, q_sdpa, k_flat, v_flat, enable_gqa=True
            ),
        }
        for name, fn in paths.items():
            issue, eager = host_us(fn, calls)
            kernel = graph_us(fn) if "JIT" not in name else float("nan")
            host = eager - kernel if eager > kernel else float("nan")
            print(f"B={batch}x{tokens:<6}{name:<34}{issue:>10.1f}{eager:>10.1f}{kernel:>10.1f}{host:>9.1f}")


def copy_bandwidth() -> float:
    """Device-to-device copy bytes/s (read + write), the practical HBM ceiling."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_us(lambda: dst.copy_(src), per_graph=5)
    return 2 * src.numel() / (us * 1e-6)


def mla_case(batch: int, heads: int, tokens: int, page: int) -> tuple[Callable[..., Any], int]:
    """sglang's MLA decode: rope and latent as views of one (tokens, 1, 576) bf16 buffer."""
    from kernel_fallback.integrations.flash_attn import _triton_decode as td

    blocks = batch * tokens // page
    kv = torch.randn(blocks, page, 1, 576, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(blocks, device="cuda").view(batch, -1).int()
    lens = torch.full((batch,), tokens, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, 1, heads, 64, device="cuda", dtype=torch.bfloat16)
    qv = torch.randn(batch, 1, heads, 512, device="cuda", dtype=torch.bfloat16)

    def call(config: Any = None) -> Any:
        return td.decode_attention(
            q,
            kv[..., :64],
            kv[..., 64:],
            lens,
            table,
            192**-0.5,
            (-1, 0),
            0.0,
            None,
            False,
            qv=qv,
            config=config,
        )

    return call, batch * tokens * 576 * 2


#: Published HBM bandwidth (bytes/s) of the GPUs the project measures on.
SPEC_HBM = {"H200": 4.8e12, "H100": 3.35e12}

MLA_SHAPES = [(b, h, t, 64) for h in (16, 128) for b in (1, 8, 64) for t in (4096, 32768)] + [
    (b, h, 4096, 1) for h in (16, 128) for b in (1, 8)
]


def kernels_section(sweep: bool) -> None:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from kernel_fallback.integrations.flash_attn import _triton_decode as td

    peak = copy_bandwidth()
    name = torch.cuda.get_device_name()
    spec = next((bw for key, bw in SPEC_HBM.items() if key in name), float("nan"))
    print(
        f"\n# MLA decode (CUDA-graph replay); {name}: copy {peak / 1e9:.0f} GB/s, spec {spec / 1e9:.0f} GB/s"
    )
    print(f"{'B':>4}{'H':>5}{'tokens':>8}{'page':>6}{'us':>10}{'GB/s':>8}{'% copy':>8}{'% spec':>8}")
    for batch, heads, tokens, page in MLA_SHAPES:
        call, nbytes = mla_case(batch, heads, tokens, page)
        us = graph_us(call, per_graph=5)
        share = nbytes / (us * 1e-6) / peak * 100
        of_spec = nbytes / (us * 1e-6) / spec * 100
        gbs = nbytes / us / 1e3
        print(f"{batch:>4}{heads:>5}{tokens:>8}{page:>6}{us:>10.1f}{gbs:>8.0f}{share:>7.0f}%{of_spec:>7.0f}%")
        del call
    print("\n# fp8 e4m3 vs bf16 decode, 32/8 heads d=128, page 64 (CUDA-graph replay)")
    print(f"{'B':>4}{'tokens':>8}{'bf16 us':>10}{'fp8 us':>10}{'ratio':>8}{'fp8 GB/s':>10}")
    for batch, tokens in ((8, 4096), (64, 4096), (8, 32768), (64, 32768)):
        times = {}
        for dtype in (torch.bfloat16, torch.float8_e4m3fn):
            c = paged(batch, tokens, 64, 8, 128, dtype)
            q = torch.randn(batch, 1, 32, 128, device="cuda").to(dtype)
            scale = torch.tensor(0.5, device="cuda").expand(batch, 8)
            extra: dict[str, Any] = (
                {"k_descale": scale, "v_descale": scale} if dtype != torch.bfloat16 else {}
            )
            fn = partial(
                td.decode_attention, q, c["k"], c["v"], c["lens"], c["page_table"], 128**-0.5, (-1, 0), 0.0,
                None, False, **extra,
            )  # fmt: skip
            times[dtype] = graph_us(fn, per_graph=5)
            del c
        bf, f8 = times[torch.bfloat16], times[torch.float8_e4m3fn]
        nbytes = batch * tokens * 8 * 128 * 2  # fp8 k + v
        print(f"{batch:>4}{tokens:>8}{bf:>10.1f}{f8:>10.1f}{f8 / bf:>8.2f}{nbytes / f8 / 1e3:>10.0f}")

    if sweep:
        configs = [td.DecodeConfig(m, n, w, s) for m, n, w, s in (
            (16, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 3), (32, 32, 8, 2), (64, 32, 8, 2),
            (64, 16, 8, 2), (32, 16, 4, 2),
        )]  # fmt: skip
        print("\n# MLA config sweep (us); columns: B,H,tokens,page")
        shapes = [
            (8, 16, 32768, 64),
            (64, 16, 4096, 64),
            (8, 128, 32768, 64),
            (64, 128, 4096, 64),
            (1, 128, 32768, 1),
        ]
        print(f"{'config':<26}" + "".join(f"{'/'.join(map(str, s)):>18}" for s in shapes))
        cases = [mla_case(*s) for s in shapes]
        defaults = [call()[0].float() for call, _ in cases]
        for cfg in configs:
            row = []
            for (call, _), want in zip(cases, defaults, strict=True):
                try:
                    us = graph_us(partial(call, cfg), per_graph=5)
                    # '!' marks a config whose output differs from the default config's
                    same = (call(cfg)[0].float() - want).abs().max().item() <= 2e-2
                    row.append(f"{us:>17.1f}{' ' if same else '!'}")
                except (OutOfResources, CompilationError) as exc:  # a config that cannot build says so
                    row.append(f"{type(exc).__name__[:16]:>18}")
            print(f"{tuple(cfg)!s:<26}" + "".join(row))


def cpu_section(calls: int) -> None:
    from kernel_fallback.integrations.flash_attn import _triton_plan as plans
    from kernel_fallback.integrations.flash_attn._checks import check_cache_args, check_common

    print("# CPU only: the provider's host-side work (no CUDA here; kernel timings need a GPU)")
    batch = 2  # small: the CPU call itself is SDPA, only its host side is of interest here
    q = torch.randn(batch, 1, 32, 128, dtype=torch.bfloat16)
    k = torch.randn(batch * 4, 64, 8, 128, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.arange(batch * 4, dtype=torch.int32).view(batch, 4)
    lens = torch.full((batch,), 100, dtype=torch.int32)
    rows: dict[str, Fn] = {
        "argument checks (check_cache_args)": lambda: check_cache_args(
            q, k, v, None, None, table, None, lens
        ),
        "dtype/head checks (check_common)": lambda: check_common(q, k, v, 0.0, None, "k_cache and v_cache"),
        "mask spec (_spec, memoized)": lambda: fast._spec((-1, -1), True, 0),
        "KERNEL_FALLBACK_TRITON read": fast.triton_decode_enabled,
        "decode_attention host half (plan hit)": partial(
            plans.prepare, q, k, v, lens, table, 128**-0.5, (-1, 0), 0.0, None, False
        ),
        "whole CPU call (SDPA decode)": lambda: fast.flash_attn_with_kvcache(
            q, k, v, cache_seqlens=lens, page_table=table, causal=True
        ),
    }
    for name, fn in rows.items():
        _, eager = host_us(fn, calls if "whole" not in name else max(1, calls // 20))
        print(f"{name:<40}{eager:>9.1f} us/call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="eager calls per timed round")
    parser.add_argument("--kernels", action="store_true", help="MLA and fp8 kernel timings (CUDA)")
    parser.add_argument("--sweep", action="store_true", help="with --kernels: MLA tile config sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        cpu_section(args.calls)
        return
    host_section(args.calls)
    if args.kernels:
        kernels_section(args.sweep)


if __name__ == "__main__":
    main()
