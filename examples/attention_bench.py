"""The FlashAttention chains' ``torch`` provider against fused SDPA and FlashAttention-4.

Used by ``gpu_bench.py --only attention`` (run that one). Every row times the chain
call and its yardsticks side by side on the same inputs (CUDA events, interleaved,
median): PyTorch's ``scaled_dot_product_attention`` and, when ``flash_attn.cute``
(flash-attn-4) imports, FlashAttention-4. bf16, 32 query heads, 8 kv heads, head dim 128,
causal, unless the row says otherwise. Sections (``--sections``):

* ``prefill``: packed varlen batches (512/1024/77/2048, 2 x 8192, 8 x 2048, window
  4096, softcap 30; SDPA loops over the sequences and computes plain causal attention,
  the nearest thing it has) and extend (8 x 512 new tokens over a 4k paged prefix, page
  1 and 64, through ``flash_attn_with_kvcache`` with ``cu_seqlens_q``). Eager, as
  sglang runs prefill.
* ``decode``: one query per sequence over a paged cache (B 1-128, 2k-128k cached, page
  1/16/64) vs SDPA over a contiguous cache, eager and replayed from a CUDA graph (ten
  calls per graph, as a decode step captures its layers).
* ``mla``: DeepSeek's absorbed MLA decode as sglang calls it (``q`` = rope part (64),
  ``qv`` = latent part (512), ``k_cache``/``v_cache`` strided views of one (.., 1, 576)
  buffer, scale 192**-0.5), H 16/128, B 1/8/64, 4k/32k cached, page 1/64: graph time and
  bandwidth (latent + rope bytes read once) as a share of a device-to-device copy
  measured in the same run. And MLA extend (8 x 512 over 4k, page 1) vs fused SDPA over
  the equivalent concatenated 576/512 math.
* ``fp8``: fp8 e4m3 q/k/v with stride-0 ``k_descale``/``v_descale`` (sglang's fp8 KV
  cache) vs the bf16 call of the same shape, graph time.

FA4 calls that FA4 refuses on this device (a configuration it does not build) show
"n/a" and the reason is printed once on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

Variant = Callable[[], Any]
CudaMs = Callable[..., dict[str, float]]
HQ, HKV, D = 32, 8, 128
SECTIONS = ("prefill", "decode", "mla", "fp8")
# What FA4 raises for a configuration it does not build here (its checks are asserts).
_FA4_REFUSALS = (AssertionError, NotImplementedError, RuntimeError, TypeError, ValueError)


def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def fa4_function() -> Callable[..., Any] | None:
    """flash-attn-4's varlen entry point, or None (said on stderr) where it does not import."""
    try:
        from flash_attn.cute.interface import flash_attn_varlen_func
    except (ImportError, OSError, RuntimeError) as exc:
        print(f"FA4 columns skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return flash_attn_varlen_func  # type: ignore[no-any-return]


def _usable(name: str, fn: Variant | None) -> Variant | None:
    """``fn`` if one call of it runs; None (and why, on stderr) if the yardstick refuses it."""
    if fn is None:
        return None
    try:
        fn()
        torch.cuda.synchronize()
    except _FA4_REFUSALS as exc:
        print(f"{name}: n/a: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        return None
    return fn


def graph_ms(fn: Variant, calls: int = 10, repeats: int = 20) -> float:
    """Median ms per call of ``fn`` replayed from a CUDA graph holding ``calls`` calls."""
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return float(sorted(times)[len(times) // 2])


def peak_total(fn: Variant) -> int:
    """Peak bytes allocated on the device while ``fn`` runs, what was there before included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def _diff(a: Any, b: Any) -> float:
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    return float((a.float() - b.float()).abs().max())


def _sdpa_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Fused SDPA per sequence of a packed batch: the baseline FA3 replaces."""
    outs, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start : start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def _paged(k_cont: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, L, H, D) cache ``k_cont`` scattered over pages: (pool, page_table)."""
    batch, length = k_cont.shape[:2]
    table = torch.randperm(batch * length // page, device="cuda").int().view(batch, -1)
    return _paged_like(k_cont, table, page), table


def _last(entry: str) -> str | None:
    from kernel_fallback.integrations.flash_attn import _fast

    return _fast.last_backend(entry)


def prefill(rows: list[dict[str, Any]], cuda_ms: CudaMs, repeats: int) -> None:
    from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    fa4 = fa4_function()
    cases: list[tuple[str, list[int], dict[str, Any]]] = [
        ("varlen 512/1024/77/2048", [512, 1024, 77, 2048], {}),
        ("varlen 2 x 8192", [8192, 8192], {}),
        ("varlen 8 x 2048", [2048] * 8, {}),
        ("2 x 8192, window 4096", [8192, 8192], {"window_size": (4096, 0)}),
        ("2 x 8192, softcap 30", [8192, 8192], {"softcap": 30.0}),
    ]
    for name, lens, extra in cases:
        q, k, v = _bf16(sum(lens), HQ, D), _bf16(sum(lens), HKV, D), _bf16(sum(lens), HKV, D)
        cu, top = _cu(lens), max(lens)
        variants: dict[str, Variant | None] = {
            "sdpa": partial(_sdpa_loop, q, k, v, lens),
            "torch": partial(flash_attn_varlen_func, q, k, v, cu, cu, top, top, causal=True, **extra),
        }
        if fa4 is not None:
            fa4_extra = dict(extra)
            if "window_size" in fa4_extra:
                fa4_extra["window_size"] = tuple(fa4_extra["window_size"])
            variants["fa4"] = _usable(
                f"prefill {name}",
                partial(fa4, q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=top,
                        max_seqlen_k=top, causal=True, **fa4_extra),
            )  # fmt: skip
        rows.append(_eager_row(f"prefill {name}", variants, cuda_ms, repeats, "flash_attn_varlen_func"))
        del q, k, v
    for page in (1, 64):
        batch, new, prefix = 8, 512, 4096
        total = prefix + new
        k_cont, v_cont = _bf16(batch, total, HKV, D), _bf16(batch, total, HKV, D)
        kp, table = _paged(k_cont, page)
        vp = _paged_like(v_cont, table, page)
        q = _bf16(batch * new, HQ, D)
        cu_q = _cu([new] * batch)
        seqlens = torch.full((batch,), total, dtype=torch.int32, device="cuda")
        variants = {
            "torch": partial(flash_attn_with_kvcache, q, kp, vp, cache_seqlens=seqlens, page_table=table,
                             cu_seqlens_q=cu_q, max_seqlen_q=new, causal=True),
        }  # fmt: skip
        if fa4 is not None:
            variants["fa4"] = _usable(
                f"extend page {page}",
                partial(fa4, q, kp, vp, cu_seqlens_q=cu_q, seqused_k=seqlens, page_table=table,
                        max_seqlen_q=new, causal=True),
            )  # fmt: skip
        name = f"extend 8 x 512 over 4k, page {page}"
        rows.append(_eager_row(name, variants, cuda_ms, repeats, "flash_attn_with_kvcache"))
        del k_cont, v_cont, kp, vp


def _paged_like(cont: torch.Tensor, table: torch.Tensor, page: int) -> torch.Tensor:
    """``cont`` (B, L, H, D) scattered over pages by an existing ``table``."""
    heads, dim = cont.shape[2:]
    pool = torch.empty(table.numel(), page, heads, dim, device="cuda", dtype=cont.dtype)
    pool[table.view(-1).long()] = cont.reshape(-1, page, heads, dim)
    return pool


def _eager_row(
    case: str, variants: dict[str, Variant | None], cuda_ms: CudaMs, repeats: int, entry: str
) -> dict[str, Any]:
    live = {name: fn for name, fn in variants.items() if fn is not None}
    ms = cuda_ms(live, 3, repeats)
    row: dict[str, Any] = {"case": case, "backend": _last(entry)}
    for name, fn in live.items():
        row[f"{name}_ms"] = ms[name]
        row[f"{name}_peak_mib"] = peak_total(fn) / 2**20
    if "fa4" in live:
        row["diff_vs_fa4"] = _diff(live["torch"](), live["fa4"]())
    return row


def decode(rows: list[dict[str, Any]], cuda_ms: CudaMs, repeats: int) -> None:
    from kernel_fallback.integrations.flash_attn import flash_attn_with_kvcache

    fa4 = fa4_function()
    for batch, cached in ((1, 131072), (8, 4096), (8, 32768), (64, 4096), (128, 2048)):
        q = _bf16(batch, 1, HQ, D)
        k_cont, v_cont = _bf16(batch, cached, HKV, D), _bf16(batch, cached, HKV, D)
        ks, vs = k_cont.transpose(1, 2), v_cont.transpose(1, 2)  # SDPA's (B, H, L, D) view
        sdpa = partial(F.scaled_dot_product_attention, q.transpose(1, 2), ks, vs, enable_gqa=True)
        seqlens = torch.full((batch,), cached, dtype=torch.int32, device="cuda")
        for page in (1, 16, 64):
            kp, table = _paged(k_cont, page)
            vp = _paged_like(v_cont, table, page)
            variants: dict[str, Variant | None] = {
                "sdpa": sdpa,
                "torch": partial(flash_attn_with_kvcache, q, kp, vp, cache_seqlens=seqlens,
                                 page_table=table, causal=True),
            }  # fmt: skip
            if fa4 is not None:
                variants["fa4"] = _usable(
                    f"decode B={batch} page={page}",
                    partial(fa4, q, kp, vp, seqused_k=seqlens, page_table=table, causal=True, num_splits=1),
                )
            row = _eager_row(f"decode B={batch} x {cached // 1024}k, page {page}", variants, cuda_ms,
                             repeats, "flash_attn_with_kvcache")  # fmt: skip
            for name, fn in variants.items():
                if fn is not None:
                    row[f"{name}_graph_ms"] = graph_ms(fn)
            rows.append(row)
            del kp, vp
        del k_cont, v_cont


def d2d_gbs() -> float:
    """Device-to-device copy rate (bytes read + written) of 2 GiB, the bandwidth yardstick."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_ms(partial(dst.copy_, src), calls=5)
    return 2 * src.numel() / (ms * 1e6)


def mla(rows: list[dict[str, Any]], cuda_ms: CudaMs, repeats: int) -> None:
    from kernel_fallback.integrations.flash_attn import flash_attn_with_kvcache

    fa4 = fa4_function()
    copy_rate = d2d_gbs()
    scale = 192**-0.5
    for heads in (16, 128):
        for batch in (1, 8, 64):
            for cached in (4096, 32768):
                for page in (1, 64):
                    pages = batch * cached // page
                    buf = _bf16(pages, page, 1, 576)  # sglang's MLA pool: latent 512 | rope 64
                    c_kv, k_rope = buf[..., :512], buf[..., 512:]
                    table = torch.randperm(pages, device="cuda").int().view(batch, -1)
                    seqlens = torch.full((batch,), cached, dtype=torch.int32, device="cuda")
                    q_rope, q_nope = _bf16(batch, 1, heads, 64), _bf16(batch, 1, heads, 512)
                    variants: dict[str, Variant | None] = {
                        "torch": partial(flash_attn_with_kvcache, q_rope, k_rope, c_kv, qv=q_nope,
                                         cache_seqlens=seqlens, page_table=table, softmax_scale=scale,
                                         causal=True),
                    }  # fmt: skip
                    if fa4 is not None:
                        variants["fa4"] = _usable(
                            f"mla H={heads} page={page}",
                            partial(fa4, q_rope, k_rope, c_kv, qv=q_nope, seqused_k=seqlens,
                                    page_table=table, softmax_scale=scale, causal=True, num_splits=1),
                        )  # fmt: skip
                    case = f"MLA decode H={heads} B={batch} x {cached // 1024}k, page {page}"
                    row = _eager_row(case, variants, cuda_ms, repeats, "flash_attn_with_kvcache")
                    for name, fn in variants.items():
                        if fn is not None:
                            row[f"{name}_graph_ms"] = graph_ms(fn)
                    nbytes = batch * cached * 576 * 2
                    row["gbs"] = nbytes / (row["torch_graph_ms"] * 1e6)
                    row["share_of_d2d"] = row["gbs"] / copy_rate
                    rows.append(row)
                    del buf
    for heads in (16, 128):
        rows.append(_mla_extend(heads, cuda_ms, repeats))


def _mla_extend(heads: int, cuda_ms: CudaMs, repeats: int) -> dict[str, Any]:
    """MLA extend (8 x 512 over 4k, page 1) vs fused SDPA over the concatenated 576/512 math."""
    from torch.nn.attention.bias import causal_lower_right

    from kernel_fallback.integrations.flash_attn import flash_attn_with_kvcache

    batch, new, total = 8, 512, 4096 + 512
    buf = _bf16(batch * total, 1, 1, 576)
    c_kv, k_rope = buf[..., :512], buf[..., 512:]
    table = torch.arange(batch * total, device="cuda", dtype=torch.int32).view(batch, total)
    seqlens = torch.full((batch,), total, dtype=torch.int32, device="cuda")
    q_rope, q_nope = _bf16(batch * new, heads, 64), _bf16(batch * new, heads, 512)
    cu_q = _cu([new] * batch)
    scale = 192**-0.5
    chain = partial(flash_attn_with_kvcache, q_rope, k_rope, c_kv, qv=q_nope, cache_seqlens=seqlens,
                    page_table=table, cu_seqlens_q=cu_q, max_seqlen_q=new, softmax_scale=scale,
                    causal=True)  # fmt: skip
    # SDPA over the same math: q = [q_nope | q_rope] (576), k = the pool rows (576), v = latent.
    q_cat = torch.cat([q_nope, q_rope], -1).view(batch, new, heads, 576).transpose(1, 2)
    k_cat = buf.view(batch, total, 1, 576).transpose(1, 2).expand(batch, heads, total, 576).contiguous()
    v_cat = c_kv.reshape(batch, total, 1, 512).transpose(1, 2).expand(batch, heads, total, 512).contiguous()
    mask = causal_lower_right(new, total)
    sdpa = _usable(
        f"MLA extend H={heads} (SDPA)",
        partial(F.scaled_dot_product_attention, q_cat, k_cat, v_cat, attn_mask=mask, scale=scale),
    )
    row = _eager_row(f"MLA extend H={heads} 8 x 512 over 4k, page 1", {"sdpa": sdpa, "torch": chain},
                     cuda_ms, repeats, "flash_attn_with_kvcache")  # fmt: skip
    if sdpa is not None:
        got = chain().view(batch, new, heads, 512)
        row["diff_vs_sdpa"] = _diff(got, sdpa().transpose(1, 2))
    return row


def fp8(rows: list[dict[str, Any]], cuda_ms: CudaMs, repeats: int) -> None:
    from kernel_fallback.integrations.flash_attn import flash_attn_with_kvcache

    for batch, cached in ((8, 4096), (64, 4096), (8, 32768), (128, 2048)):
        for page in (1, 64):
            q = _bf16(batch, 1, HQ, D)
            k_cont, v_cont = _bf16(batch, cached, HKV, D), _bf16(batch, cached, HKV, D)
            kp, table = _paged(k_cont, page)
            vp = _paged_like(v_cont, table, page)
            seqlens = torch.full((batch,), cached, dtype=torch.int32, device="cuda")
            scale = torch.tensor(0.5, device="cuda")
            k8, v8 = (t.div(scale).to(torch.float8_e4m3fn) for t in (kp, vp))
            descale = scale.expand(batch, HKV)  # sglang: a 0-d scale, stride 0
            call = partial(flash_attn_with_kvcache, cache_seqlens=seqlens, page_table=table, causal=True)
            bf16_call = partial(call, q, kp, vp)
            fp8_call = partial(call, q.to(torch.float8_e4m3fn), k8, v8, k_descale=descale, v_descale=descale)
            row = _eager_row(f"fp8 decode B={batch} x {cached // 1024}k, page {page}",
                             {"torch": fp8_call, "bf16": bf16_call}, cuda_ms, repeats,
                             "flash_attn_with_kvcache")  # fmt: skip
            row["torch_graph_ms"] = graph_ms(fp8_call)
            row["bf16_graph_ms"] = graph_ms(bf16_call)
            row["diff_vs_bf16"] = _diff(fp8_call(), bf16_call())
            rows.append(row)
            del kp, vp, k8, v8, k_cont, v_cont


def run(sections: tuple[str, ...], rows: list[dict[str, Any]], cuda_ms: CudaMs, repeats: int) -> None:
    """Measure ``sections`` (names from :data:`SECTIONS`), appending one dict per row."""
    for name in sections:
        {"prefill": prefill, "decode": decode, "mla": mla, "fp8": fp8}[name](rows, cuda_ms, repeats)


def _fmt(row: dict[str, Any], key: str, spec: str = ".3f") -> str:
    value = row.get(key)
    return "n/a" if value is None else format(value, spec)


def _ratio(row: dict[str, Any], num: str, den: str) -> str:
    a, b = row.get(num), row.get(den)
    return "n/a" if a is None or b is None else f"{a / b:.2f}x"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as Markdown tables, one per kind of row."""
    lines = [
        "| case | SDPA ms | FA4 ms | chain ms | chain/FA4 | chain/SDPA | peak chain/FA4 "
        "| graph SDPA ms | graph FA4 ms | graph chain ms | graph chain/FA4 | diff vs FA4 | backend |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if r["case"].startswith(("fp8", "MLA extend")):
            continue
        lines.append(
            f"| {r['case']} | {_fmt(r, 'sdpa_ms')} | {_fmt(r, 'fa4_ms')} | {_fmt(r, 'torch_ms')} | "
            f"{_ratio(r, 'torch_ms', 'fa4_ms')} | {_ratio(r, 'torch_ms', 'sdpa_ms')} | "
            f"{_ratio(r, 'torch_peak_mib', 'fa4_peak_mib')} | {_fmt(r, 'sdpa_graph_ms')} | "
            f"{_fmt(r, 'fa4_graph_ms')} | {_fmt(r, 'torch_graph_ms')} | "
            f"{_ratio(r, 'torch_graph_ms', 'fa4_graph_ms')} | {_fmt(r, 'diff_vs_fa4', '.3g')} | "
            f"{r['backend']} |"
        )
    mla_rows = [r for r in rows if "gbs" in r]
    if mla_rows:
        lines += [
            "",
            "| MLA decode | graph chain ms | GB/s | share of d2d copy |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['case']} | {r['torch_graph_ms']:.3f} | {r['gbs']:.0f} | {r['share_of_d2d']:.0%} |"
            for r in mla_rows
        ]
    other = [r for r in rows if r["case"].startswith(("fp8", "MLA extend"))]
    if other:
        lines += ["", "| case | baseline ms | chain ms | chain/baseline | max abs diff | backend |"]
        lines += ["| --- | ---: | ---: | ---: | ---: | --- |"]
        for r in other:
            base = "bf16_graph_ms" if r["case"].startswith("fp8") else "sdpa_ms"
            mine = "torch_graph_ms" if r["case"].startswith("fp8") else "torch_ms"
            diff = r.get("diff_vs_bf16", r.get("diff_vs_sdpa"))
            lines.append(
                f"| {r['case']} | {_fmt(r, base)} | {_fmt(r, mine)} | {_ratio(r, mine, base)} | "
                f"{'n/a' if diff is None else format(diff, '.3g')} | {r['backend']} |"
            )
    return "\n".join(lines) + "\n"
