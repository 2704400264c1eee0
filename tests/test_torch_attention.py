"""Tests for the pure-torch FlashAttention-3 reference in ``_torch_attention``.

Everything is checked against ``_ref_sequence``, an independent float64
implementation written as explicit per-(head, query, key) loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from kernel_fallback.integrations.flash_attn._reference import (
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)

TOL = 1e-5


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _ref_sequence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    chunk: int = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Float64 attention of one sequence by plain loops.

    q (Lq, Hq, D), k (Lk, Hkv, D), v (Lk, Hkv, Dv) -> out (Lq, Hq, Dv), lse (Hq, Lq).
    ``chunk`` > 0 is FA3's ``attention_chunk``: keys outside the query's chunk are hidden.
    """
    q, k, v = q.double(), k.double(), v.double()
    lq, hq, _ = q.shape
    lk, hkv, dv = v.shape
    group = hq // hkv
    left, right = window
    if causal:
        right = 0
    out = torch.zeros(lq, hq, dv, dtype=torch.float64)
    lse = torch.full((hq, lq), -math.inf, dtype=torch.float64)
    for h in range(hq):
        kv_head = h // group
        for i in range(lq):
            diag = i + lk - lq  # key aligned with query i (bottom-right)
            logits: list[float] = []
            keys: list[int] = []
            for j in range(lk):
                if right >= 0 and j - diag > right:
                    continue
                if left >= 0 and diag - j > left:
                    continue
                # attention_chunk: only keys of diag's own chunk, on both sides (hopper/mask.h)
                if chunk > 0 and not diag - diag % chunk <= j < diag - diag % chunk + chunk:
                    continue
                s = scale * float(torch.dot(q[i, h], k[j, kv_head]))
                if softcap > 0:
                    s = softcap * math.tanh(s / softcap)
                logits.append(s)
                keys.append(j)
            all_logits = logits + ([float(sinks[h])] if sinks is not None else [])
            if not all_logits:
                continue
            m = max(all_logits)
            denom = sum(math.exp(x - m) for x in all_logits)
            lse[h, i] = m + math.log(denom)
            for s, j in zip(logits, keys, strict=True):
                out[i, h] += math.exp(s - m) / denom * v[j, kv_head]
    return out, lse


def _assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    """Max abs error relative to max |expected| < TOL; -inf entries must match exactly."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    ninf = torch.isneginf(expected)
    assert torch.equal(torch.isneginf(actual), ninf), f"{what}: -inf positions differ"
    finite = ~ninf
    if not finite.any():
        return
    scale = expected[finite].abs().max().clamp_min(1e-12)
    err = (actual[finite] - expected[finite]).abs().max() / scale
    assert err < TOL, f"{what}: relative error {float(err):.3g}"


@dataclass
class Case:
    lens_q: list[int]
    lens_k: list[int]
    hq: int = 4
    hkv: int = 4
    d: int = 16
    dv: int = 16
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    use_sinks: bool = False
    scale: float | None = None
    chunk: int = 0
    extra: dict[str, int] = field(default_factory=dict)


VARLEN_CASES = [
    pytest.param(Case([5, 1, 9], [7, 4, 9]), id="plain-varlen"),
    pytest.param(Case([3, 6, 9], [8, 6, 4], causal=True), id="causal-bottom-right"),
    pytest.param(Case([4, 7], [9, 12], window=(3, 1)), id="window-left3-right1"),
    pytest.param(Case([6, 5], [10, 5], window=(2, -1)), id="window-left-only"),
    pytest.param(Case([6, 5], [10, 5], window=(-1, 0)), id="window-right0-equals-causal"),
    pytest.param(Case([6, 8], [10, 5], causal=True, window=(2, 5)), id="causal-with-window"),
    pytest.param(Case([5, 3], [6, 9], softcap=2.0, scale=0.7), id="softcap-custom-scale"),
    pytest.param(Case([5, 3], [6, 9], hq=8, hkv=2, causal=True), id="gqa-8-2"),
    pytest.param(Case([5, 3], [6, 9], hq=8, hkv=1), id="mqa-8-1"),
    pytest.param(Case([4, 6], [8, 6], hq=8, hkv=2, use_sinks=True), id="sinks-gqa"),
    pytest.param(Case([9, 2], [4, 2], causal=True, use_sinks=True), id="sinks-masked-rows"),
    pytest.param(Case([4, 3], [6, 5], d=16, dv=8), id="dv-differs"),
    pytest.param(Case([2, 0, 4], [3, 4, 0]), id="empty-sequences"),
    pytest.param(
        Case(
            [7, 5], [11, 6], hq=8, hkv=2, d=8, dv=12, causal=True, window=(4, -1), softcap=5.0, use_sinks=True
        ),
        id="everything",
    ),
    # attention_chunk (Llama-4 chunked local attention), with Lq != Lk in most sequences.
    pytest.param(Case([7, 20, 3], [23, 20, 9], causal=True, chunk=4), id="chunk4-causal"),
    pytest.param(Case([9, 21, 5], [37, 21, 18], causal=True, chunk=16), id="chunk16-causal"),
    pytest.param(Case([6, 10, 4], [19, 10, 13], chunk=4), id="chunk4-noncausal"),
    pytest.param(Case([8, 30], [40, 33], chunk=16), id="chunk16-noncausal"),
    pytest.param(Case([12, 5], [6, 5], causal=True, chunk=4), id="chunk4-causal-lq-gt-lk"),
    pytest.param(Case([12, 3], [6, 17], chunk=4), id="chunk4-noncausal-lq-gt-lk"),
    pytest.param(Case([9, 6], [26, 6], causal=True, window=(5, -1), chunk=4), id="chunk4-causal-window"),
    pytest.param(Case([10, 17], [35, 20], window=(20, 2), chunk=16), id="chunk16-window-right2"),
    pytest.param(
        Case([11, 4], [29, 18], hq=8, hkv=2, causal=True, softcap=4.0, use_sinks=True, chunk=16),
        id="chunk16-causal-gqa-softcap-sinks",
    ),
]


def _cu(lens: list[int]) -> Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("case", VARLEN_CASES)
def test_varlen_matches_reference(case: Case) -> None:
    gen = torch.Generator().manual_seed(1234)
    q = _randn(gen, sum(case.lens_q), case.hq, case.d)
    k = _randn(gen, sum(case.lens_k), case.hkv, case.d)
    v = _randn(gen, sum(case.lens_k), case.hkv, case.dv)
    sinks = _randn(gen, case.hq) if case.use_sinks else None
    out, lse = flash_attn_varlen_func(
        q,
        k,
        v,
        _cu(case.lens_q),
        _cu(case.lens_k),
        max_seqlen_q=max(case.lens_q),
        max_seqlen_k=max(case.lens_k),
        softmax_scale=case.scale,
        causal=case.causal,
        window_size=case.window,
        attention_chunk=case.chunk,
        softcap=case.softcap,
        sinks=sinks,
        return_softmax_lse=True,
    )
    assert out.dtype == torch.float32
    assert lse.dtype == torch.float32
    assert lse.shape == (case.hq, q.shape[0])
    scale = case.scale if case.scale is not None else case.d**-0.5
    ref_out, ref_lse = [], []
    q0 = k0 = 0
    for lq, lk in zip(case.lens_q, case.lens_k, strict=True):
        o, s = _ref_sequence(
            q[q0 : q0 + lq],
            k[k0 : k0 + lk],
            v[k0 : k0 + lk],
            scale=scale,
            causal=case.causal,
            window=case.window,
            chunk=case.chunk,
            softcap=case.softcap,
            sinks=sinks,
        )
        ref_out.append(o)
        ref_lse.append(s)
        q0, k0 = q0 + lq, k0 + lk
    _assert_close(out, torch.cat(ref_out), "out")
    _assert_close(lse, torch.cat(ref_lse, dim=1), "lse")
    plain = flash_attn_varlen_func(
        q,
        k,
        v,
        _cu(case.lens_q),
        _cu(case.lens_k),
        softmax_scale=case.scale,
        causal=case.causal,
        window_size=case.window,
        attention_chunk=case.chunk,
        softcap=case.softcap,
        sinks=sinks,
    )
    assert isinstance(plain, Tensor)
    assert torch.equal(plain, out)
    if case.chunk:  # the chunk cases must exercise the chunk mask
        unchunked = flash_attn_varlen_func(
            q,
            k,
            v,
            _cu(case.lens_q),
            _cu(case.lens_k),
            softmax_scale=case.scale,
            causal=case.causal,
            window_size=case.window,
            softcap=case.softcap,
            sinks=sinks,
        )
        assert isinstance(unchunked, Tensor)
        assert not torch.allclose(unchunked, out)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_chunk_mask_support(causal: bool) -> None:
    # Identity values make out[i, h] the attention row of query i, so its support is the mask.
    # Lq=3, Lk=10: rows sit at positions 7, 8, 9; with C=4 their chunks start at 4, 8, 8.
    gen = torch.Generator().manual_seed(8)
    q, k, v = _randn(gen, 3, 2, 8), _randn(gen, 10, 2, 8), torch.eye(10)[:, None, :].repeat(1, 2, 1)
    out = flash_attn_varlen_func(q, k, v, _cu([3]), _cu([10]), causal=causal, attention_chunk=4)
    assert isinstance(out, Tensor)
    # Without causal the chunk still bounds both sides: row 0 (position 7) stops at key 7.
    want = [[4, 5, 6, 7], [8], [8, 9]] if causal else [[4, 5, 6, 7], [8, 9], [8, 9]]
    for i, keys in enumerate(want):
        for h in range(2):
            assert (out[i, h] > 0).nonzero().flatten().tolist() == keys
        assert torch.allclose(out[i].sum(-1), torch.ones(2))


def test_fully_masked_rows_are_zero_with_neg_inf_lse() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = _randn(gen, 6, 2, 8), _randn(gen, 2, 2, 8), _randn(gen, 2, 2, 8)
    cu_q, cu_k = _cu([6]), _cu([2])
    out, lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=True, return_softmax_lse=True)
    # Lq=6, Lk=2: rows 0..3 see no key under bottom-right causal alignment.
    assert torch.all(out[:4] == 0)
    assert torch.all(torch.isneginf(lse[:, :4]))
    assert torch.isfinite(lse[:, 4:]).all()
    assert out[4:].abs().sum() > 0
    sinks = torch.tensor([0.5, -1.25])
    out_s, lse_s = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, causal=True, sinks=sinks, return_softmax_lse=True
    )
    assert torch.all(out_s[:4] == 0)
    assert torch.equal(lse_s[:, :4], sinks[:, None].expand(2, 4))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_seqused(causal: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    lens_q, lens_k = [6, 5, 4], [9, 7, 8]
    used_q, used_k = [4, 5, 0], [5, 7, 3]
    q = _randn(gen, sum(lens_q), 8, 16)
    k, v = _randn(gen, sum(lens_k), 2, 16), _randn(gen, sum(lens_k), 2, 16)
    out, lse = flash_attn_varlen_func(
        q,
        k,
        v,
        _cu(lens_q),
        _cu(lens_k),
        seqused_q=torch.tensor(used_q, dtype=torch.int32),
        seqused_k=torch.tensor(used_k, dtype=torch.int32),
        causal=causal,
        return_softmax_lse=True,
    )
    ref_out = torch.zeros(q.shape[0], 8, 16, dtype=torch.float64)
    ref_lse = torch.full((8, q.shape[0]), -math.inf, dtype=torch.float64)
    q0 = k0 = 0
    for lq, lk, uq, uk in zip(lens_q, lens_k, used_q, used_k, strict=True):
        o, s = _ref_sequence(q[q0 : q0 + uq], k[k0 : k0 + uk], v[k0 : k0 + uk], scale=16**-0.5, causal=causal)
        ref_out[q0 : q0 + uq], ref_lse[:, q0 : q0 + uq] = o, s
        q0, k0 = q0 + lq, k0 + lk
    _assert_close(out, ref_out, "out")
    _assert_close(lse, ref_lse, "lse")


def test_float64_in_float64_out() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = (_randn(gen, 5, 4, 8, dtype=torch.float64) for _ in range(3))
    out, lse = flash_attn_varlen_func(q, k, v, _cu([2, 3]), _cu([2, 3]), causal=True, return_softmax_lse=True)
    assert out.dtype == torch.float64
    assert lse.dtype == torch.float32
    ref = torch.cat(
        [
            _ref_sequence(q[:2], k[:2], v[:2], scale=8**-0.5, causal=True)[0],
            _ref_sequence(q[2:], k[2:], v[2:], scale=8**-0.5, causal=True)[0],
        ]
    )
    assert (out - ref).abs().max() < 1e-12
    cache = flash_attn_with_kvcache(q[None], k[None], v[None], causal=True)
    assert isinstance(cache, Tensor)
    assert cache.dtype == torch.float64


def test_bfloat16_output_dtype() -> None:
    gen = torch.Generator().manual_seed(4)
    q, k, v = (_randn(gen, 5, 4, 8, dtype=torch.bfloat16) for _ in range(3))
    out, lse = flash_attn_varlen_func(q, k, v, _cu([5]), _cu([5]), return_softmax_lse=True)
    assert out.dtype == torch.bfloat16
    assert lse.dtype == torch.float32
    ref, _ = _ref_sequence(q, k, v, scale=8**-0.5)
    assert (out.double() - ref).abs().max() < 2e-2


def _cache_reference(
    q: Tensor, keys: list[Tensor], values: list[Tensor], **kwargs: object
) -> tuple[Tensor, Tensor]:
    """Stack per-batch reference results: out (B, Sq, Hq, Dv), lse (B, Hq, Sq)."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        o, s = _ref_sequence(q[b], keys[b], values[b], **kwargs)  # type: ignore[arg-type]
        outs.append(o)
        lses.append(s)
    return torch.stack(outs), torch.stack(lses)


@dataclass
class CacheOpts:
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    use_sinks: bool = False


KVCACHE_CASES = [
    pytest.param(CacheOpts(), id="plain"),
    pytest.param(CacheOpts(causal=True), id="causal"),
    pytest.param(CacheOpts(causal=True, window=(3, -1)), id="causal-window"),
    pytest.param(CacheOpts(softcap=3.0, use_sinks=True), id="softcap-sinks"),
]


@pytest.mark.parametrize("opts", KVCACHE_CASES)
@pytest.mark.parametrize("sq", [1, 4], ids=["decode", "extend"])
def test_kvcache_with_cache_seqlens(opts: CacheOpts, sq: int) -> None:
    gen = torch.Generator().manual_seed(11)
    bsz, s_cache, hq, hkv, d = 3, 12, 8, 2, 16
    q = _randn(gen, bsz, sq, hq, d)
    k_cache, v_cache = _randn(gen, bsz, s_cache, hkv, d), _randn(gen, bsz, s_cache, hkv, d)
    seqlens = [7, 12, 4]
    causal, window, softcap = opts.causal, opts.window, opts.softcap
    sinks = _randn(gen, hq) if opts.use_sinks else None
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
        causal=causal,
        window_size=window,
        softcap=softcap,
        sinks=sinks,
        return_softmax_lse=True,
    )
    ref_out, ref_lse = _cache_reference(
        q,
        [k_cache[b, :n] for b, n in enumerate(seqlens)],
        [v_cache[b, :n] for b, n in enumerate(seqlens)],
        scale=d**-0.5,
        causal=causal,
        window=window,
        softcap=softcap,
        sinks=sinks,
    )
    assert out.shape == (bsz, sq, hq, d)
    assert lse.shape == (bsz, hq, sq)
    _assert_close(out, ref_out, "out")
    _assert_close(lse, ref_lse, "lse")


def test_kvcache_default_uses_full_cache() -> None:
    gen = torch.Generator().manual_seed(12)
    q, k_cache, v_cache = _randn(gen, 2, 3, 4, 8), _randn(gen, 2, 6, 4, 8), _randn(gen, 2, 6, 4, 8)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, causal=True)
    assert isinstance(out, Tensor)
    ref, _ = _cache_reference(q, list(k_cache), list(v_cache), scale=8**-0.5, causal=True)
    _assert_close(out, ref, "out")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kvcache_appends_new_kv(causal: bool) -> None:
    gen = torch.Generator().manual_seed(13)
    bsz, s_cache, s_new, hq, hkv, d = 2, 10, 3, 8, 2, 8
    q = _randn(gen, bsz, 3, hq, d)
    k_cache, v_cache = _randn(gen, bsz, s_cache, hkv, d), _randn(gen, bsz, s_cache, hkv, d)
    k_new, v_new = _randn(gen, bsz, s_new, hkv, d), _randn(gen, bsz, s_new, hkv, d)
    seqlens = [2, 7]
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k=k_new,
        v=v_new,
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
        causal=causal,
        return_softmax_lse=True,
    )
    for b, n in enumerate(seqlens):
        assert torch.equal(k_cache[b, n : n + s_new], k_new[b])
        assert torch.equal(v_cache[b, n : n + s_new], v_new[b])
        keep = torch.ones(s_cache, dtype=torch.bool)
        keep[n : n + s_new] = False
        assert torch.equal(k_cache[b, keep], k_before[b, keep])
        assert torch.equal(v_cache[b, keep], v_before[b, keep])
    keys = [torch.cat([k_before[b, :n], k_new[b]]) for b, n in enumerate(seqlens)]
    values = [torch.cat([v_before[b, :n], v_new[b]]) for b, n in enumerate(seqlens)]
    ref_out, ref_lse = _cache_reference(q, keys, values, scale=d**-0.5, causal=causal)
    _assert_close(out, ref_out, "out")
    _assert_close(lse, ref_lse, "lse")


def _paged_setup(
    gen: torch.Generator, bsz: int, page_size: int, max_blocks: int, hkv: int, d: int
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """Logical per-sequence caches scattered into shuffled physical blocks."""
    num_blocks = bsz * max_blocks + 2
    perm = torch.randperm(num_blocks, generator=gen)[: bsz * max_blocks]
    page_table = perm.reshape(bsz, max_blocks).to(torch.int32)
    k_cache, v_cache = _randn(gen, num_blocks, page_size, hkv, d), _randn(gen, num_blocks, page_size, hkv, d)
    logical_k = [torch.cat([k_cache[int(p)] for p in page_table[b]]) for b in range(bsz)]
    logical_v = [torch.cat([v_cache[int(p)] for p in page_table[b]]) for b in range(bsz)]
    return k_cache, v_cache, page_table, logical_k, logical_v


@pytest.mark.parametrize("append", [False, True], ids=["read-only", "append"])
def test_kvcache_paged(append: bool) -> None:
    gen = torch.Generator().manual_seed(21)
    bsz, page_size, max_blocks, hq, hkv, d, sq, s_new = 3, 4, 4, 8, 2, 8, 2, 3
    k_cache, v_cache, page_table, logical_k, logical_v = _paged_setup(gen, bsz, page_size, max_blocks, hkv, d)
    q = _randn(gen, bsz, sq, hq, d)
    seqlens = [5, 13, 1]
    k_new = _randn(gen, bsz, s_new, hkv, d) if append else None
    v_new = _randn(gen, bsz, s_new, hkv, d) if append else None
    sinks = _randn(gen, hq)
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k=k_new,
        v=v_new,
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
        page_table=page_table,
        causal=True,
        sinks=sinks,
        return_softmax_lse=True,
    )
    keys, values = [], []
    for b, n in enumerate(seqlens):
        lk, lv = logical_k[b][:n], logical_v[b][:n]
        if k_new is not None and v_new is not None:
            lk, lv = torch.cat([lk, k_new[b]]), torch.cat([lv, v_new[b]])
            for t in range(s_new):  # the written token must sit in the mapped block
                pos = n + t
                block = int(page_table[b, pos // page_size])
                assert torch.equal(k_cache[block, pos % page_size], k_new[b, t])
                assert torch.equal(v_cache[block, pos % page_size], v_new[b, t])
        keys.append(lk)
        values.append(lv)
    ref_out, ref_lse = _cache_reference(q, keys, values, scale=d**-0.5, causal=True, sinks=sinks)
    _assert_close(out, ref_out, "out")
    _assert_close(lse, ref_lse, "lse")


def test_kvcache_varlen_q_paged() -> None:
    gen = torch.Generator().manual_seed(31)
    page_size, max_blocks, hq, hkv, d = 4, 3, 4, 2, 8
    k_cache, v_cache, page_table, logical_k, logical_v = _paged_setup(gen, 2, page_size, max_blocks, hkv, d)
    lens_q, seqlens = [3, 1], [9, 12]
    q = _randn(gen, sum(lens_q), hq, d)
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
        page_table=page_table,
        cu_seqlens_q=_cu(lens_q),
        max_seqlen_q=3,
        causal=True,
        return_softmax_lse=True,
    )
    assert out.shape == (4, hq, d)
    assert lse.shape == (hq, 4)
    o0, s0 = _ref_sequence(q[:3], logical_k[0][:9], logical_v[0][:9], scale=d**-0.5, causal=True)
    o1, s1 = _ref_sequence(q[3:], logical_k[1], logical_v[1], scale=d**-0.5, causal=True)
    _assert_close(out, torch.cat([o0, o1]), "out")
    _assert_close(lse, torch.cat([s0, s1], dim=1), "lse")


CHUNK_MASKS = [
    pytest.param(False, (-1, -1), id="noncausal"),
    pytest.param(True, (-1, -1), id="causal"),
    pytest.param(True, (6, -1), id="causal-window"),
]


@pytest.mark.parametrize(("causal", "window"), CHUNK_MASKS)
@pytest.mark.parametrize("chunk", [4, 16], ids=["chunk4", "chunk16"])
@pytest.mark.parametrize("sq", [1, 5], ids=["decode", "extend"])
def test_kvcache_attention_chunk(causal: bool, window: tuple[int, int], chunk: int, sq: int) -> None:
    gen = torch.Generator().manual_seed(41)
    bsz, s_cache, s_new, hq, hkv, d = 3, 40, 2, 8, 2, 16
    q = _randn(gen, bsz, sq, hq, d)
    k_cache, v_cache = _randn(gen, bsz, s_cache, hkv, d), _randn(gen, bsz, s_cache, hkv, d)
    k_new, v_new = _randn(gen, bsz, s_new, hkv, d), _randn(gen, bsz, s_new, hkv, d)
    seqlens = [35, 17, 3]  # Lk = seqlens + s_new: chunk boundaries fall inside the queries' range
    keys = [torch.cat([k_cache[b, :n], k_new[b]]) for b, n in enumerate(seqlens)]
    values = [torch.cat([v_cache[b, :n], v_new[b]]) for b, n in enumerate(seqlens)]
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k=k_new,
        v=v_new,
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
        causal=causal,
        window_size=window,
        attention_chunk=chunk,
        return_softmax_lse=True,
    )
    ref_out, ref_lse = _cache_reference(
        q, keys, values, scale=d**-0.5, causal=causal, window=window, chunk=chunk
    )
    _assert_close(out, ref_out, "out")
    _assert_close(lse, ref_lse, "lse")
    unchunked, _ = _cache_reference(q, keys, values, scale=d**-0.5, causal=causal, window=window)
    assert not torch.allclose(unchunked, ref_out)


@pytest.mark.parametrize("chunk", [4, 16], ids=["chunk4", "chunk16"])
def test_kvcache_attention_chunk_varlen_q_paged(chunk: int) -> None:
    gen = torch.Generator().manual_seed(42)
    page_size, max_blocks, hq, hkv, d = 4, 8, 4, 2, 8
    k_cache, v_cache, page_table, logical_k, logical_v = _paged_setup(gen, 2, page_size, max_blocks, hkv, d)
    lens_q, seqlens = [7, 2], [30, 19]
    q = _randn(gen, sum(lens_q), hq, d)
    sinks = _randn(gen, hq)
    out, lse = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
        page_table=page_table,
        cu_seqlens_q=_cu(lens_q),
        causal=True,
        attention_chunk=chunk,
        sinks=sinks,
        return_softmax_lse=True,
    )
    refs = [
        _ref_sequence(
            q[q0 : q0 + lq],
            logical_k[b][:n],
            logical_v[b][:n],
            scale=d**-0.5,
            causal=True,
            chunk=chunk,
            sinks=sinks,
        )
        for b, (q0, lq, n) in enumerate(zip([0, lens_q[0]], lens_q, seqlens, strict=True))
    ]
    _assert_close(out, torch.cat([o for o, _ in refs]), "out")
    _assert_close(lse, torch.cat([s for _, s in refs], dim=1), "lse")


def _varlen_inputs() -> dict[str, object]:
    gen = torch.Generator().manual_seed(5)
    return {
        "q": _randn(gen, 6, 8, 16),
        "k": _randn(gen, 6, 2, 16),
        "v": _randn(gen, 6, 2, 16),
        "cu_seqlens_q": _cu([2, 4]),
        "cu_seqlens_k": _cu([3, 3]),
    }


VARLEN_ERRORS = [
    pytest.param(
        {"k": torch.ones(6, 3, 16), "v": torch.ones(6, 3, 16)},
        r"query heads \(8\).*multiple.*key/value heads \(3\)",
        id="heads-not-divisible",
    ),
    pytest.param(
        {"cu_seqlens_q": torch.tensor([0, 2, 6])}, r"cu_seqlens_q.*torch\.int32", id="cu-seqlens-int64"
    ),
    pytest.param(
        {"cu_seqlens_k": torch.tensor([0, 3, 9], dtype=torch.int32)},
        r"cu_seqlens_k must be non-decreasing within \[0, 6\]",
        id="cu-seqlens-overflow",
    ),
    pytest.param(
        {"cu_seqlens_k": torch.tensor([0, 6], dtype=torch.int32)},
        r"cu_seqlens_k has 2 entries but cu_seqlens_q has 3",
        id="batch-mismatch",
    ),
    pytest.param(
        {"v": torch.ones(5, 2, 16)}, r"k and v must have the same number of rows", id="kv-rows-mismatch"
    ),
    pytest.param(
        {"k": torch.ones(6, 2, 8)}, r"k head dim \(8\) must equal q head dim \(16\)", id="head-dim-mismatch"
    ),
    pytest.param(
        {"q": torch.ones(6, 8, 16, dtype=torch.float64)}, r"must have q's dtype", id="dtype-mismatch"
    ),
    pytest.param({"q": torch.ones(2, 6, 8, 16)}, r"q must be 3-D", id="q-4d"),
    pytest.param({"sinks": torch.ones(2)}, r"sinks must have shape \(8,\)", id="sinks-shape"),
    pytest.param({"window_size": (-2, 0)}, r"window_size must be a pair", id="window-bad"),
    pytest.param({"softcap": -1.0}, r"softcap must be >= 0", id="softcap-negative"),
    pytest.param(
        {"attention_chunk": -4},
        r"attention_chunk must be an int >= 0 .*got -4",
        id="attention-chunk-negative",
    ),
    pytest.param(
        {"seqused_k": torch.tensor([3, 3])}, r"seqused_k must have dtype torch\.int32", id="seqused-dtype"
    ),
    pytest.param(
        {"seqused_q": torch.tensor([3, 1], dtype=torch.int32)},
        r"seqused_q must lie in \[0, sequence span",
        id="seqused-too-long",
    ),
    pytest.param(
        {"qv": torch.ones(6, 8, 8)},
        r"qv must have shape \(6, 8, 16\) \(q's shape with the value head dim 16\), got \(6, 8, 8\)",
        id="qv-shape",
    ),
    pytest.param({"qv": torch.ones(6, 8, 16, dtype=torch.float64)}, r"qv must have q's dtype", id="qv-dtype"),
    pytest.param(
        {"k_descale": torch.ones(2, 3)},
        r"k_descale must be a float32 tensor of shape \(2, 2\) \(batch, kv heads\), got .*\(2, 3\)",
        id="descale-shape",
    ),
    pytest.param(
        {"v_descale": torch.ones(2, 2, dtype=torch.float64)},
        r"v_descale must be a float32 tensor .*got torch\.float64",
        id="descale-dtype",
    ),
]


@pytest.mark.parametrize(("override", "match"), VARLEN_ERRORS)
def test_varlen_invalid_inputs(override: dict[str, object], match: str) -> None:
    kwargs = _varlen_inputs() | override
    with pytest.raises(ValueError, match=match):
        flash_attn_varlen_func(**kwargs)  # type: ignore[arg-type]


def _cache_inputs() -> dict[str, object]:
    gen = torch.Generator().manual_seed(6)
    return {
        "q": _randn(gen, 2, 1, 4, 8),
        "k_cache": _randn(gen, 2, 6, 2, 8),
        "v_cache": _randn(gen, 2, 6, 2, 8),
        "cache_seqlens": torch.tensor([3, 5], dtype=torch.int32),
    }


KVCACHE_ERRORS = [
    pytest.param(
        {"cache_seqlens": torch.tensor([3, 5])}, r"cache_seqlens.*torch\.int32", id="cache-seqlens-int64"
    ),
    pytest.param(
        {"cache_seqlens": torch.tensor([3], dtype=torch.int32)},
        r"cache_seqlens must have shape \(2,\)",
        id="cache-seqlens-shape",
    ),
    pytest.param({"k": torch.ones(2, 1, 2, 8)}, r"k and v must be given together", id="k-without-v"),
    pytest.param(
        {"k": torch.ones(2, 2, 2, 8), "v": torch.ones(2, 2, 2, 8)},
        r"cache_seqlens \+ Sk_new \(2\) must lie in \[0, 6\]",
        id="append-overflow",
    ),
    pytest.param(
        {"k": torch.ones(2, 1, 3, 8), "v": torch.ones(2, 1, 3, 8)},
        r"k must have shape \(2, Sk_new, 2, 8\)",
        id="k-new-heads",
    ),
    pytest.param(
        {"page_table": torch.zeros(2, 2, dtype=torch.int64)},
        r"page_table must be an int32 tensor",
        id="page-table-dtype",
    ),
    pytest.param(
        {"page_table": torch.tensor([[0], [9]], dtype=torch.int32)},
        r"page_table entries must lie in \[0, 2\)",
        id="page-table-range",
    ),
    pytest.param(
        {"k_cache": torch.ones(3, 6, 2, 8), "v_cache": torch.ones(3, 6, 2, 8)},
        r"k_cache batch size \(3\) must equal the batch size of q \(2\)",
        id="cache-batch-mismatch",
    ),
    pytest.param(
        {"v_cache": torch.ones(2, 5, 2, 8)}, r"v_cache shape .* must match k_cache", id="v-cache-shape"
    ),
    pytest.param({"cu_seqlens_q": _cu([1, 1])}, r"q must be \(total_q, Hq, D\)", id="varlen-q-needs-3d"),
    pytest.param({"q": torch.ones(2, 1, 3, 8)}, r"query heads \(3\)", id="heads-not-divisible"),
    pytest.param(
        {"attention_chunk": -1},
        r"attention_chunk must be an int >= 0 .*got -1",
        id="attention-chunk-negative",
    ),
    pytest.param({"qv": torch.ones(2, 4, 8)}, r"qv must have shape \(2, 1, 4, 8\)", id="qv-shape"),
    pytest.param(
        {"q_descale": torch.tensor(1.0).expand(2, 1)},
        r"q_descale must be a float32 tensor of shape \(2, 2\)",
        id="descale-shape",
    ),
]


@pytest.mark.parametrize(("override", "match"), KVCACHE_ERRORS)
def test_kvcache_invalid_inputs(override: dict[str, object], match: str) -> None:
    kwargs = _cache_inputs() | override
    with pytest.raises(ValueError, match=match):
        flash_attn_with_kvcache(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fn", "inputs"),
    [
        pytest.param(flash_attn_varlen_func, _varlen_inputs, id="varlen"),
        pytest.param(flash_attn_with_kvcache, _cache_inputs, id="kvcache"),
    ],
)
def test_attention_chunk_none_and_zero_mean_off(
    fn: Callable[..., tuple[Tensor, Tensor]], inputs: Callable[[], dict[str, object]]
) -> None:
    kwargs = inputs() | {"causal": True, "window_size": (1, -1), "return_softmax_lse": True}
    out, lse = fn(**kwargs)
    for off in (None, 0):
        out_off, lse_off = fn(**kwargs, attention_chunk=off)
        assert torch.equal(out_off, out)
        assert torch.equal(lse_off, lse)


_NEW = {"k": torch.ones(2, 1, 2, 8), "v": torch.ones(2, 1, 2, 8)}
_ROPE = {"rotary_cos": torch.ones(12, 4), "rotary_sin": torch.zeros(12, 4)}

KVCACHE_EXTRA_ERRORS = [
    pytest.param(
        {"cache_batch_idx": torch.tensor([0, 1])},
        r"cache_batch_idx must be an int32 tensor",
        id="batch-idx-dtype",
    ),
    pytest.param(
        {"cache_batch_idx": torch.tensor([0, 2], dtype=torch.int32)},
        r"cache_batch_idx entries must lie in \[0, 2\) \(cache rows\), got \[0, 2\]",
        id="batch-idx-range",
    ),
    pytest.param(
        {"cache_leftpad": torch.tensor([4, 0], dtype=torch.int32)},
        r"cache_leftpad must lie in \[0, cache_seqlens \[3, 5\]\], got \[4, 0\]",
        id="leftpad-past-seqlens",
    ),
    pytest.param(
        {"cache_leftpad": torch.tensor([0], dtype=torch.int32)},
        r"cache_leftpad must be an int32 tensor of shape \(2,\)",
        id="leftpad-shape",
    ),
    pytest.param(_ROPE, r"rotary_cos/rotary_sin need new keys k and v", id="rotary-without-k"),
    pytest.param(
        {**_NEW, "rotary_cos": torch.ones(12, 4)},
        r"rotary_cos and rotary_sin must be given together",
        id="cos-only",
    ),
    pytest.param(
        {**_NEW, "rotary_cos": torch.ones(12, 5), "rotary_sin": torch.ones(12, 5)},
        r"rotary_dim <= head dim 8, got \(12, 5\)",
        id="rotary-dim-too-big",
    ),
    pytest.param(
        {**_NEW, "rotary_cos": torch.ones(12, 4, dtype=torch.float64), "rotary_sin": torch.ones(12, 4)},
        r"rotary_cos and rotary_sin must have q's dtype torch\.float32",
        id="rotary-dtype",
    ),
    pytest.param(
        {**_NEW, **_ROPE, "rotary_seqlens": torch.tensor([0, 12], dtype=torch.int32)},
        r"rotary positions run past rotary_cos/rotary_sin \(12 rows\): starts \[0, 12\]",
        id="rotary-past-table",
    ),
    pytest.param(
        {
            "k": torch.ones(3, 2, 8),
            "v": torch.ones(3, 2, 8),
            "cu_seqlens_k_new": torch.tensor([0, 2, 1], dtype=torch.int32),
        },
        r"cu_seqlens_k_new must be non-decreasing within \[0, 3\]",
        id="cu-new-decreasing",
    ),
    pytest.param(
        {
            "k": torch.ones(4, 2, 8),
            "v": torch.ones(4, 2, 8),
            "cu_seqlens_k_new": torch.tensor([0, 1, 4], dtype=torch.int32),
        },
        r"cache_seqlens \+ new keys must lie in \[0, 6\] .*new keys \[1, 3\]",
        id="cu-new-overflow",
    ),
    pytest.param(
        {"k": torch.ones(2, 1, 2, 8), "v": torch.ones(2, 1, 2, 8), "cu_seqlens_k_new": _cu([1, 1])},
        r"k must have shape \(total_new, 2, 8\) with cu_seqlens_k_new",
        id="cu-new-k-4d",
    ),
]


@pytest.mark.parametrize(("override", "match"), KVCACHE_EXTRA_ERRORS)
def test_kvcache_extras_invalid_inputs_leave_the_cache_alone(override: dict[str, object], match: str) -> None:
    kwargs = _cache_inputs() | override
    before = kwargs["k_cache"].clone()  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=match):
        flash_attn_with_kvcache(**kwargs)  # type: ignore[arg-type]
    assert torch.equal(kwargs["k_cache"], before)  # type: ignore[arg-type]  # checked before any write


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"cu_seqlens_k_new": _cu([1, 1])}, id="cu-new-without-k"),
        pytest.param({"rotary_interleaved": False}, id="interleaved-without-rotary"),
        pytest.param(
            {"rotary_seqlens": torch.tensor([1, 2], dtype=torch.int32)}, id="rotary-seqlens-without-rotary"
        ),
    ],
)
def test_kvcache_extras_fa3_ignores_alone_change_nothing(extra: dict[str, object]) -> None:
    plain = flash_attn_with_kvcache(**_cache_inputs(), causal=True)  # type: ignore[arg-type]
    got = flash_attn_with_kvcache(**_cache_inputs(), causal=True, **extra)  # type: ignore[arg-type]
    assert isinstance(got, Tensor)
    assert isinstance(plain, Tensor)
    assert torch.equal(got, plain)


def test_kvcache_leftpad_and_batch_idx_are_a_slice_of_the_cache() -> None:
    # Keys [leftpad, cache_seqlens) of cache row cache_batch_idx[b], masks over them alone.
    kwargs = _cache_inputs()
    k_cache, v_cache = kwargs["k_cache"], kwargs["v_cache"]
    assert isinstance(k_cache, Tensor)
    assert isinstance(v_cache, Tensor)
    got = flash_attn_with_kvcache(
        **kwargs,  # type: ignore[arg-type]
        causal=True,
        cache_batch_idx=torch.tensor([1, 0], dtype=torch.int32),
        cache_leftpad=torch.tensor([2, 1], dtype=torch.int32),
    )
    q = kwargs["q"]
    assert isinstance(q, Tensor)
    for b, (row, lo, hi) in enumerate([(1, 2, 3), (0, 1, 5)]):
        want, _ = _ref_sequence(q[b], k_cache[row, lo:hi], v_cache[row, lo:hi], scale=8**-0.5, causal=True)
        _assert_close(got[b], want, "out")


# -- MLA (qv) and fp8 descales (issue 14); tests/test_mla_fp8_oracle.py checks the formula ---


def test_qv_equals_attention_over_concatenated_heads() -> None:
    """qv @ v^T joins the scores: the same as [q, qv] against [k, v] with values v."""
    gen = torch.Generator().manual_seed(21)
    q, k = _randn(gen, 7, 4, 8, dtype=torch.float64), _randn(gen, 7, 1, 8, dtype=torch.float64)
    v, qv = _randn(gen, 7, 1, 24, dtype=torch.float64), _randn(gen, 7, 4, 24, dtype=torch.float64)
    cu = _cu([3, 4])
    out, lse = flash_attn_varlen_func(q, k, v, cu, cu, causal=True, qv=qv, return_softmax_lse=True)
    want, want_lse = flash_attn_varlen_func(
        torch.cat([q, qv], -1), torch.cat([k, v], -1), v, cu, cu, causal=True, return_softmax_lse=True,
        softmax_scale=32**-0.5,  # FA3's default with qv: (D + Dv) ** -0.5
    )  # fmt: skip
    _assert_close(out, want, "out")
    _assert_close(lse, want_lse, "lse")


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_gives_bfloat16_and_reads_the_descales(fp8: str) -> None:
    dtype = getattr(torch, fp8)
    gen = torch.Generator().manual_seed(22)
    q, k_cache, v_cache = (
        _randn(gen, *shape).to(dtype) for shape in ((2, 1, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8))
    )
    lens = torch.tensor([3, 5], dtype=torch.int32)
    plain = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    assert isinstance(plain, Tensor)
    assert plain.dtype == torch.bfloat16
    # v_descale scales the output; a k_descale of 1 changes nothing.
    two, one = torch.tensor(2.0).expand(2, 2), torch.ones(2, 2)
    scaled = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, v_descale=two, k_descale=one)
    assert isinstance(scaled, Tensor)
    assert torch.equal(scaled, (plain.double() * 2).bfloat16())


def test_descales_are_ignored_for_16_and_32_bit_inputs_as_in_fa3() -> None:
    inputs = _cache_inputs()
    plain = flash_attn_with_kvcache(**inputs)  # type: ignore[arg-type]
    scaled = flash_attn_with_kvcache(**inputs, k_descale=torch.full((2, 2), 3.0))  # type: ignore[arg-type]
    assert isinstance(plain, Tensor)
    assert isinstance(scaled, Tensor)
    assert torch.equal(plain, scaled)
