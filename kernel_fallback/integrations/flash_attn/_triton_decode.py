"""Split-K ("flash-decoding") attention over a paged or contiguous KV cache, in Triton.

The decode path of the ``torch`` provider on CUDA. Two launches, no host read of any
value (``cache_seqlens``, ``page_table``), so a call can be captured in a CUDA graph:

1. grid (batch, kv_head, split): each program takes the query rows of every query head
   of its kv group (GQA packed into the rows of one tile), walks its share of the cache
   keys, following ``page_table`` key by key (any page size; a contiguous cache is one
   page per sequence), and writes an fp32 partial output and log-sum-exp.
2. grid (batch, q_head, q_row): merges the splits by their log-sum-exp, folds in the
   sink logit, writes ``out`` in q's dtype and, when asked, the float32 lse in FA3's
   (B, Hq, Sq) layout.

The number of splits depends only on shapes (cache capacity, batch x kv heads, SM
count), never on values. Masks: bottom-right causal / sliding window (left and right
bounds), cache lengths; softcap; sinks. ``attention_chunk`` and packed q are not here
(the caller keeps them on flex_attention). Inputs bf16 or fp16, fp32 accumulation.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU
tensors; the tests use that.
"""

# Triton kernels take untyped pointer and scalar arguments (their annotations drive
# Triton's specialization), so mypy's strict def checks are off for this module only.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["MAX_ROWS", "decode_attention", "num_splits"]

#: Most query rows per kv head (q heads per kv head x query length) one tile takes.
MAX_ROWS = 64
_BLOCK_N = 64
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton at import, as here
_LOG2E = 1.4426950408889634
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # kernels read constexpr globals only


@triton.jit
def _attend_block(
    n0, stop, q, m_i, l_i, acc, lo, hi, b, h,
    k_ptr, v_ptr, pt_ptr, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_ptb, sm_scale_log2, softcap,
    offs_d, offs_dv,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    keys = n0 + tl.arange(0, BLOCK_N)
    key_ok = keys < stop
    if PAGED:
        page = tl.load(pt_ptr + b.to(tl.int64) * s_ptb + keys // PAGE_SIZE, mask=key_ok, other=0)
        page = page.to(tl.int64)
        slot = keys % PAGE_SIZE
    else:
        page = tl.zeros([BLOCK_N], dtype=tl.int64) + b
        slot = keys
    k = tl.load(
        k_ptr + page[:, None] * s_kp + slot[:, None] * s_ks + h * s_kh + offs_d[None, :],
        mask=key_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    s = tl.dot(q, tl.trans(k))  # fp32
    if SOFTCAP:
        # softcap * tanh(x / softcap), tanh written with exp (overflow gives +-1)
        x = s * (sm_scale_log2 * _LN2) / softcap
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) / _LN2
    else:
        s = s * sm_scale_log2
    allowed = (keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None]) & key_ok[None, :]
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    vt = tl.load(
        v_ptr + page[:, None] * s_vp + slot[:, None] * s_vs + h * s_vh + offs_dv[None, :],
        mask=key_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, lens_ptr, o_part_ptr, lse_part_ptr,
    s_qb, s_qs, s_qh,
    s_kp, s_ks, s_kh,
    s_vp, s_vs, s_vh,
    s_ptb,
    sm_scale_log2, softcap,
    window_left, window_right,
    SQ: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, SPLITS: tl.constexpr,
    KEYS_PER_SPLIT: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_M)  # row r: query head h*G + r // SQ, query position r % SQ
    row_ok = rows < G * SQ
    q_head = h * G + rows // SQ
    q_pos = rows % SQ
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        q_ptr + b.to(tl.int64) * s_qb + q_pos[:, None] * s_qs + q_head[:, None] * s_qh + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    len_k = tl.load(lens_ptr + b)
    # Bottom-right alignment: row at position p sees keys up to p + len_k - SQ (+ right).
    diag = q_pos + len_k - SQ
    lo = tl.zeros([BLOCK_M], dtype=tl.int32)
    hi = tl.zeros([BLOCK_M], dtype=tl.int32) + len_k
    if window_right >= 0:
        hi = tl.minimum(hi, diag + window_right + 1)
    if window_left >= 0:
        lo = tl.maximum(lo, diag - window_left)
    lo = tl.where(row_ok, lo, len_k)
    hi = tl.where(row_ok, hi, 0)
    start = split * KEYS_PER_SPLIT
    stop = tl.minimum(start + KEYS_PER_SPLIT, tl.max(hi, axis=0))
    first = tl.maximum(start, tl.min(lo, axis=0))
    first = start + ((first - start) // BLOCK_N) * BLOCK_N  # first >= start, so // is exact
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if INTERPRET:
        # numpy >= 2.4 cannot turn the interpreter's loop bounds into ints: a static trip
        # count with a guard computes the same blocks.
        for i in range(0, KEYS_PER_SPLIT // BLOCK_N):
            n0 = start + i * BLOCK_N
            if (n0 >= first) & (n0 < stop):
                m_i, l_i, acc = _attend_block(
                    n0, stop, q, m_i, l_i, acc, lo, hi, b, h, k_ptr, v_ptr, pt_ptr, s_kp, s_ks, s_kh,
                    s_vp, s_vs, s_vh, s_ptb, sm_scale_log2, softcap, offs_d, offs_dv,
                    D, DV, BLOCK_N, PAGE_SIZE, PAGED, SOFTCAP,
                )  # fmt: skip
    else:
        for n0 in range(first, stop, BLOCK_N):
            m_i, l_i, acc = _attend_block(
                n0, stop, q, m_i, l_i, acc, lo, hi, b, h, k_ptr, v_ptr, pt_ptr, s_kp, s_ks, s_kh,
                    s_vp, s_vs, s_vh, s_ptb, sm_scale_log2, softcap, offs_d, offs_dv,
                D, DV, BLOCK_N, PAGE_SIZE, PAGED, SOFTCAP,
            )  # fmt: skip
    # Partial lse in log2 units; -inf where this split saw no key of the row.
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    base = ((b * HKV + h) * SPLITS + split).to(tl.int64) * BLOCK_M
    tl.store(lse_part_ptr + base + rows, lse)
    tl.store(o_part_ptr + (base + rows[:, None]) * BLOCK_DV + offs_dv[None, :], out)


@triton.jit
def _decode_merge_kernel(
    o_part_ptr, lse_part_ptr, sinks_ptr, out_ptr, lse_ptr,
    s_ob, s_os, s_oh,
    SQ: tl.constexpr, G: tl.constexpr, HKV: tl.constexpr, SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SINKS: tl.constexpr, WRITE_LSE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    qh = tl.program_id(1)
    pos = tl.program_id(2)
    h = qh // G
    row = (qh % G) * SQ + pos
    splits = tl.arange(0, SPLITS_P2)
    offs_dv = tl.arange(0, BLOCK_DV)
    base = ((b * HKV + h) * SPLITS + splits).to(tl.int64) * BLOCK_M + row
    lse_s = tl.load(lse_part_ptr + base, mask=splits < SPLITS, other=float("-inf"))
    m = tl.max(lse_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse_s - m_safe)
    total = tl.sum(w, axis=0)
    parts = tl.load(
        o_part_ptr + base[:, None] * BLOCK_DV + offs_dv[None, :], mask=(splits < SPLITS)[:, None], other=0.0
    )
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, (m_safe + tl.log2(total)) * _LN2, float("-inf"))  # natural log
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + qh).to(tl.float32)
        both = tl.maximum(lse, sink)
        with_sink = both + tl.log(tl.exp(lse - both) + tl.exp(sink - both))
        out = out * tl.exp(lse - with_sink)
        lse = with_sink
    dst = out_ptr + b.to(tl.int64) * s_ob + pos * s_os + qh * s_oh + offs_dv
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=offs_dv < DV)
    if WRITE_LSE:
        tl.store(lse_ptr + (b * G * HKV + qh) * SQ + pos, lse)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 8  # the interpreter: a few splits, so the tests exercise the merge


def num_splits(batch: int, hkv: int, capacity: int, device: torch.device) -> int:
    """Splits over the keys, from shapes only: about two programs per SM, >= 1 key block each."""
    blocks = max(1, math.ceil(capacity / _BLOCK_N))
    want = math.ceil(2 * _sm_count(device) / max(1, batch * hkv))
    return max(1, min(blocks, want, 128))


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lens_k: Tensor,
    page_table: Tensor | None,
    scale: float,
    window: tuple[int, int],
    softcap: float,
    sinks: Tensor | None,
    want_lse: bool,
) -> tuple[Tensor, Tensor | None]:
    """Attention of q (B, Sq, Hq, D) over a cache; returns out (B, Sq, Hq, Dv) and lse or None.

    ``k_cache``/``v_cache`` are (num_pages, page_size, Hkv, D[v]) with ``page_table``
    (B, pages_per_seq) int32, or (B, capacity, Hkv, D[v]) without. ``lens_k`` (B,) holds
    each sequence's key count on the device (int32 or int64). ``window`` is (left, right),
    -1 for unbounded, causal already folded in as right = 0. lse is float32 (B, Hq, Sq).
    The caller checks shapes and that ``Hq // Hkv * Sq <= MAX_ROWS``.
    """
    batch, sq, hq, d = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    g = hq // hkv
    page_size = k_cache.shape[1]
    capacity = page_table.shape[1] * page_size if page_table is not None else page_size
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have a unit stride in the head dim")
    block_m = max(16, triton.next_power_of_2(g * sq))
    block_d, block_dv = triton.next_power_of_2(d), triton.next_power_of_2(dv)
    splits = num_splits(batch, hkv, capacity, q.device)
    keys_per_split = math.ceil(math.ceil(capacity / _BLOCK_N) / splits) * _BLOCK_N
    dev = q.device
    o_part = torch.empty(batch, hkv, splits, block_m, block_dv, dtype=torch.float32, device=dev)
    lse_part = torch.empty(batch, hkv, splits, block_m, dtype=torch.float32, device=dev)
    lens = lens_k.to(device=dev, dtype=torch.int32)
    pt = page_table.to(dev) if page_table is not None else lens  # unread without a page table
    _decode_split_kernel[(batch, hkv, splits)](
        q, k_cache, v_cache, pt, lens, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        pt.stride(0) if page_table is not None else 0,
        scale * _LOG2E, float(softcap),
        window[0], window[1],
        SQ=sq, G=g, HKV=hkv, SPLITS=splits, KEYS_PER_SPLIT=keys_per_split, D=d, DV=dv,
        BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PAGE_SIZE=page_size if page_table is not None else 1,
        PAGED=page_table is not None, SOFTCAP=softcap > 0, INTERPRET=_INTERPRET,
    )  # fmt: skip
    out = torch.empty(batch, sq, hq, dv, dtype=q.dtype, device=dev)
    lse = torch.empty(batch, hq, sq, dtype=torch.float32, device=dev) if want_lse else o_part
    sink_arg = sinks.to(device=dev, dtype=torch.float32) if sinks is not None else lse_part
    _decode_merge_kernel[(batch, hq, sq)](
        o_part, lse_part, sink_arg, out, lse,
        out.stride(0), out.stride(1), out.stride(2),
        SQ=sq, G=g, HKV=hkv, SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits),
        DV=dv, BLOCK_M=block_m, BLOCK_DV=block_dv,
        HAS_SINKS=sinks is not None, WRITE_LSE=want_lse,
    )  # fmt: skip
    return out, (lse if want_lse else None)
