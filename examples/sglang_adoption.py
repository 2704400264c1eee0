"""sglang's FlashAttention-3 call sites, with the kernel call replaced by the chain.

Run: ``python examples/sglang_adoption.py`` (no GPU needed: the chain falls back to the
torch provider and says so). The two wrappers below are a reduced rewrite of sglang
0.5.23's ``python/sglang/jit_kernel/flash_attention_v3.py``: same signatures, same call
shapes (``flash_attn_with_kvcache`` gets 28 arguments by position, then ``sm_margin``,
``only_qv``, ``return_softmax_lse``, ``sinks``, ``out`` by keyword; the varlen call is all
keywords), but no loader, no ``TypeError`` retry for ``out`` and no FA2 branch: the chain
does those, once, with an event. The backend-style functions then make every call shape
sglang's FA3 backend makes, and check each result against a float64 reference:

1. prefill: varlen, causal, ``attention_chunk=0``, ``num_splits=1`` (sglang's defaults);
2. decode: a paged cache, ``num_splits=0``, ``ver=3``;
3. extend: new tokens over a cached prefix, ``cu_seqlens_k_new`` with ``k=None``;
4. cascade: a shared prefix and per-request suffixes, each returning the softmax lse
   (unpacked ``o, lse, *rest``), merged;
5. MLA (DeepSeek-V2/V3/R1, absorbed): decode and extend with ``qv``, rope 64 / latent 512,
   one kv head, ``k_rope`` and ``c_kv`` strided views of one (tokens, 1, 576) buffer, the
   YaRN-scaled ``softmax_scale``; checked against attention over the concatenated heads;
6. fp8 KV (``--kv-cache-dtype fp8_e4m3``): q cast to e4m3, ``k_descale``/``v_descale`` a
   0-d scale ``.expand(batch, kv_heads)`` (stride 0), bfloat16 output;
7. ``ver=4`` without FlashAttention-4 installed: refused, naming what is allowed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kernel_fallback import PolicyConfigError, ProviderUnavailableError
from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func as fa3_varlen
from kernel_fallback.integrations.flash_attn import flash_attn_with_kvcache as fa3_kvcache
from kernel_fallback.testing import capture_fallbacks

# -- sglang's wrappers, with the chain as the kernel ----------------------------------------


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    qv: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: Tensor | int | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    page_table: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k_new: Tensor | None = None,
    max_seqlen_q: int | None = None,
    rotary_seqlens: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int | None = None,
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    scheduler_metadata: Tensor | None = None,
    num_splits: int = 0,
    pack_gqa: bool | None = None,
    only_qv: bool = False,
    sm_margin: int = 0,
    return_softmax_lse: bool = False,
    sinks: Tensor | None = None,
    out: Tensor | None = None,
    ver: int = 3,
) -> Any:
    """sglang's kvcache wrapper: its checks, then the kernel call in sglang's exact shape."""
    if k_cache is not None and k_cache.stride(-1) != 1:
        raise ValueError("k_cache must have contiguous last dimension")
    if v_cache.stride(-1) != 1:
        raise ValueError("v_cache must have contiguous last dimension")
    return fa3_kvcache(
        q,
        k_cache,
        v_cache,
        k,
        v,
        qv,
        rotary_cos,
        rotary_sin,
        cache_seqlens,
        cache_batch_idx,
        cache_leftpad,
        page_table,
        cu_seqlens_q,
        cu_seqlens_k_new,
        max_seqlen_q,
        rotary_seqlens,
        q_descale,
        k_descale,
        v_descale,
        softmax_scale,
        causal,
        window_size,
        attention_chunk,
        softcap,
        rotary_interleaved,
        scheduler_metadata,
        num_splits,
        pack_gqa,
        sm_margin=sm_margin,
        only_qv=only_qv,
        return_softmax_lse=return_softmax_lse,
        sinks=sinks,
        out=out,
        ver=ver,
    )


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    seqused_q: Tensor | None = None,
    seqused_k: Tensor | None = None,
    page_table: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    qv: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    only_qv: bool = False,
    sm_margin: int = 0,
    return_softmax_lse: bool = False,
    sinks: Tensor | None = None,
    out: Tensor | None = None,
    ver: int = 3,
) -> Any:
    """sglang's varlen wrapper: every argument by keyword, as sglang passes them."""
    return fa3_varlen(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        seqused_q=seqused_q,
        seqused_k=seqused_k,
        page_table=page_table,
        softmax_scale=softmax_scale,
        causal=causal,
        qv=qv,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        window_size=window_size,
        attention_chunk=attention_chunk,
        softcap=softcap,
        num_splits=num_splits,
        pack_gqa=pack_gqa,
        only_qv=only_qv,
        sm_margin=sm_margin,
        return_softmax_lse=return_softmax_lse,
        sinks=sinks,
        out=out,
        ver=ver,
    )


# -- a float64 reference, one sequence at a time --------------------------------------------


def reference(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """(out (Lq, Hq, Dv), lse (Hq, Lq)) of one sequence; causal aligned to the bottom right."""
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", qd, kd) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        shift = k.shape[0] - q.shape[0]
        allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + shift
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vd), lse


def close(got: Tensor, want: Tensor) -> bool:
    return bool(torch.allclose(got.double(), want.double(), atol=1e-4, rtol=1e-4))


# -- the call shapes of sglang's FA3 backend -------------------------------------------------

HQ, HKV, D, PAGE = 8, 2, 64, 4


def paged(
    gen: torch.Generator, lengths: list[int]
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """A paged KV cache holding ``lengths`` tokens per request: (k_cache, v_cache, page_table, ks, vs)."""
    pages = [(n + PAGE - 1) // PAGE for n in lengths]
    k_cache = torch.randn(sum(pages) + 1, PAGE, HKV, D, generator=gen)
    v_cache = torch.randn(sum(pages) + 1, PAGE, HKV, D, generator=gen)
    order = torch.randperm(sum(pages), generator=gen) + 1  # page 0 stays unused
    table = torch.zeros(len(lengths), max(pages), dtype=torch.int32)
    ks, vs, start = [], [], 0
    for i, (n, p) in enumerate(zip(lengths, pages, strict=True)):
        table[i, :p] = order[start : start + p]
        start += p
        ks.append(torch.cat([k_cache[int(b)] for b in table[i, :p]])[:n])
        vs.append(torch.cat([v_cache[int(b)] for b in table[i, :p]])[:n])
    return k_cache, v_cache, table, ks, vs


def cu(lengths: list[int]) -> Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def prefill(gen: torch.Generator) -> bool:
    lens = [5, 3]
    q, k, v = (torch.randn(sum(lens), h, D, generator=gen) for h in (HQ, HKV, HKV))
    o = flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), max(lens), max(lens), causal=True)
    refs = [
        reference(q[a:b], k[a:b], v[a:b], causal=True)[0]
        for a, b in zip(cu(lens)[:-1], cu(lens)[1:], strict=True)
    ]
    return close(o, torch.cat(refs))


def decode(gen: torch.Generator) -> bool:
    lens = [7, 10, 3]
    k_cache, v_cache, table, ks, vs = paged(gen, lens)
    q = torch.randn(len(lens), HQ, D, generator=gen)  # one new token per request, packed
    o = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens=torch.tensor(lens, dtype=torch.int32),
        page_table=table,
        cu_seqlens_q=cu([1] * len(lens)),
        max_seqlen_q=1,
        causal=True,
        num_splits=0,
        ver=3,
    )
    return all(
        close(o[i : i + 1], reference(q[i : i + 1], ks[i], vs[i], causal=True)[0]) for i in range(len(lens))
    )


def extend(gen: torch.Generator) -> bool:
    cached, new = [6, 9], [3, 2]  # the new tokens' keys are already in the cache
    k_cache, v_cache, table, ks, vs = paged(gen, [c + n for c, n in zip(cached, new, strict=True)])
    q = torch.randn(sum(new), HQ, D, generator=gen)
    o, _lse, *_rest = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens=torch.tensor([c + n for c, n in zip(cached, new, strict=True)], dtype=torch.int32),
        page_table=table,
        cu_seqlens_q=cu(new),
        cu_seqlens_k_new=cu(new),  # FA3 reads it only with k/v: neutral here
        max_seqlen_q=max(new),
        causal=True,
        return_softmax_lse=True,
    )
    offsets = cu(new).tolist()
    return all(
        close(
            o[offsets[i] : offsets[i + 1]],
            reference(q[offsets[i] : offsets[i + 1]], ks[i], vs[i], causal=True)[0],
        )
        for i in range(len(new))
    )


def merge(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> Tensor:
    """Combine two partial attentions over disjoint keys by their log-sum-exps."""
    lse = torch.logaddexp(lse1, lse2)  # (H, L)
    w1, w2 = torch.exp(lse1 - lse).T[..., None], torch.exp(lse2 - lse).T[..., None]
    return w1 * o1 + w2 * o2


def cascade(gen: torch.Generator) -> bool:
    prefix, suffixes = 8, [3, 4]  # two requests sharing an 8-token prefix
    k_cache, v_cache, table, ks, vs = paged(gen, [prefix])
    q = torch.randn(sum(suffixes), HQ, D, generator=gen)
    k_sfx, v_sfx = (torch.randn(sum(suffixes), HKV, D, generator=gen) for _ in range(2))
    # Prefix: every query sees the whole shared prefix (not causal), one page table row each.
    o1, lse1, *_rest = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens=torch.tensor([prefix] * len(suffixes), dtype=torch.int32),
        page_table=table.expand(len(suffixes), -1).contiguous(),
        cu_seqlens_q=cu(suffixes),
        cu_seqlens_k_new=cu(suffixes),
        max_seqlen_q=max(suffixes),
        causal=False,
        return_softmax_lse=True,
    )
    o2, lse2, *_rest = flash_attn_varlen_func(
        q,
        k_sfx,
        v_sfx,
        cu(suffixes),
        cu(suffixes),
        max(suffixes),
        max(suffixes),
        causal=True,
        return_softmax_lse=True,
    )
    o = merge(o1, lse1, o2, lse2)
    offsets = cu(suffixes).tolist()
    results = []
    for i in range(len(suffixes)):
        a, b = offsets[i], offsets[i + 1]
        keys, values = torch.cat([ks[0], k_sfx[a:b]]), torch.cat([vs[0], v_sfx[a:b]])
        results.append(close(o[a:b], reference(q[a:b], keys, values, causal=True)[0]))
    return all(results)


MLA_ROPE, MLA_LATENT, MLA_HEADS = 64, 512, 16  # DeepSeek-V3: 128 heads / TP 8
#: sglang's MLA scale: 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim), times YaRN's mscale squared.
MLA_SCALE = (128 + MLA_ROPE) ** -0.5 * 1.2**2


def mla_cache(
    gen: torch.Generator, lens: list[int], page: int
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """sglang's MLA cache: one (tokens, 1, 576) buffer, [c_kv | k_rope], seen through a page table.

    Returns k_rope (pages, page, 1, 64) and c_kv (pages, page, 1, 512), strided views of
    that buffer, the page table and each request's logical (len, 1, 576) rows.
    """
    pages = [(n + page - 1) // page for n in lens]
    buf = torch.randn((sum(pages) + 1) * page, 1, MLA_LATENT + MLA_ROPE, generator=gen)
    paged_buf = buf.view(-1, page, 1, MLA_LATENT + MLA_ROPE)
    k_rope, c_kv = paged_buf[..., MLA_LATENT:], paged_buf[..., :MLA_LATENT]
    order = torch.randperm(sum(pages), generator=gen) + 1
    table = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    rows, start = [], 0
    for i, (n, p) in enumerate(zip(lens, pages, strict=True)):
        table[i, :p] = order[start : start + p]
        start += p
        rows.append(torch.cat([paged_buf[int(b)] for b in table[i, :p]])[:n])
    return k_rope, c_kv, table, rows


def mla_reference(q_rope: Tensor, q_nope: Tensor, rows: Tensor) -> Tensor:
    """MLA written without ``qv``: q = [q_nope, q_rope] against k = [c_kv, k_rope], v = c_kv."""
    q = torch.cat([q_nope, q_rope], -1)
    return reference(q, rows, rows[..., :MLA_LATENT], causal=True, scale=MLA_SCALE)[0]


def mla(gen: torch.Generator) -> bool:
    """MLA decode (page size 1, sglang's default) and extend (page size 16) with ``qv``."""
    results = []
    for page, new in ((1, [1, 1, 1]), (16, [3, 1, 5])):
        lens = [11 + n for n in new]  # cached tokens, the new ones included
        k_rope, c_kv, table, rows = mla_cache(gen, lens, page)
        q_rope = torch.randn(sum(new), MLA_HEADS, MLA_ROPE, generator=gen)
        q_nope = torch.randn(sum(new), MLA_HEADS, MLA_LATENT, generator=gen)
        o, _lse, *_rest = flash_attn_with_kvcache(
            q=q_rope,
            k_cache=k_rope,
            v_cache=c_kv,
            qv=q_nope,
            page_table=table,
            cache_seqlens=torch.tensor(lens, dtype=torch.int32),
            cu_seqlens_q=cu(new),
            cu_seqlens_k_new=cu(new),
            max_seqlen_q=max(new),
            softmax_scale=MLA_SCALE,
            causal=True,
            softcap=0.0,
            k_descale=None,
            v_descale=None,
            num_splits=0,
            return_softmax_lse=True,  # what the cascade path asks for
        )
        offsets = cu(new).tolist()
        for i in range(len(new)):
            a, b = offsets[i], offsets[i + 1]
            results.append(close(o[a:b], mla_reference(q_rope[a:b], q_nope[a:b], rows[i])))
    return all(results)


def fp8_decode(gen: torch.Generator) -> bool:
    """fp8 KV decode: q cast to e4m3, stride-0 descales (batch, kv_heads), bfloat16 output."""
    fp8 = torch.float8_e4m3fn
    lens = [7, 10, 3]
    k_cache, v_cache, table, _ks, _vs = paged(gen, lens)
    k_scale = torch.tensor(0.5)  # a layer's 0-d scale, as sglang keeps it
    k_cache, v_cache = (k_cache / k_scale).to(fp8), (v_cache / k_scale).to(fp8)
    q = torch.randn(len(lens), HQ, D, generator=gen)
    descale = k_scale.expand(len(lens), HKV)  # stride 0, as sglang passes it
    o = flash_attn_with_kvcache(
        q.to(fp8),
        k_cache,
        v_cache,
        cache_seqlens=torch.tensor(lens, dtype=torch.int32),
        page_table=table,
        cu_seqlens_q=cu([1] * len(lens)),
        cu_seqlens_k_new=cu([1] * len(lens)),
        max_seqlen_q=1,
        softmax_scale=D**-0.5,
        causal=True,
        k_descale=descale,
        v_descale=descale,
        num_splits=0,
    )
    results = [o.dtype == torch.bfloat16]
    for i, n in enumerate(lens):
        pages = table[i, : (n + PAGE - 1) // PAGE].long()
        keys = k_cache[pages].flatten(0, 1)[:n].double() * k_scale.double()
        values = v_cache[pages].flatten(0, 1)[:n].double() * k_scale.double()
        want = reference(q[i : i + 1].to(fp8).double(), keys, values, causal=True)[0]
        results.append(bool((o[i : i + 1].double() - want).abs().max() <= 2**-7 * want.abs().max()))
    return all(results)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    with capture_fallbacks() as events:
        shapes = {
            "prefill": prefill(gen),
            "decode": decode(gen),
            "extend": extend(gen),
            "cascade": cascade(gen),
        }
        shapes["mla (qv)"] = mla(gen)
        shapes["fp8 decode"] = fp8_decode(gen)
    print(f"active providers: varlen {fa3_varlen.chain.active}, kvcache {fa3_kvcache.chain.active}")
    for name, ok in shapes.items():
        print(f"{name}: matches the float64 reference: {ok}")
    kinds = sorted({(e.kind, e.kernel, e.subject) for e in events})
    print(f"events: {kinds}")  # the provider choice only: hints and neutral values are no fallbacks
    q = torch.zeros(2, HQ, D)
    for ver in (4, 5):
        try:
            flash_attn_varlen_func(q, q[:, :HKV], q[:, :HKV], cu([2]), cu([2]), 2, 2, ver=ver)
        except (ProviderUnavailableError, PolicyConfigError) as exc:
            print(f"ver={ver}: {type(exc).__name__}: {str(exc)[:120]}")


if __name__ == "__main__":
    main()
