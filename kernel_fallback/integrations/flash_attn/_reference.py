"""Exact pure-torch reference (the oracle) of the FlashAttention-3 entry points.

Mirrors ``sgl_kernel.flash_attn.flash_attn_varlen_func`` and
``sgl_kernel.flash_attn.flash_attn_with_kvcache`` (sgl-kernel 0.3.21) for the
argument subset listed in each signature. It runs on any device torch supports;
it loops over the sequences of a batch in Python and vectorizes over heads and
positions within a sequence.

Semantics shared by both entry points:

* Scores are ``softmax_scale * q @ k^T`` (default scale ``1/sqrt(head_dim)``),
  then ``softcap * tanh(scores / softcap)`` when ``softcap > 0``, then masking.
* Grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``.
* Masks are aligned to the bottom right: with ``shift = Lk - Lq``, query ``i``
  may attend key ``j`` iff ``i + shift - left <= j <= i + shift + right``, where
  a window side of ``-1`` is unbounded and ``causal`` forces ``right = 0``.
* ``attention_chunk`` ``C > 0`` (chunked local attention, as in Llama-4) further
  restricts query ``i`` to keys of its own chunk, on both sides:
  ``c <= j < c + C`` with ``c = ((i + shift) // C) * C`` (as FA3's ``hopper/mask.h``,
  causal or not); ``0`` and ``None`` turn it off.
* ``window_size`` may be a pair of ints, a pair of 0-d integer tensors or a
  2-element integer tensor (as upstream's tests pass it).
* ``sinks`` (one logit per query head, natural-log units, neither scaled nor
  capped) adds a virtual key to the softmax denominator that carries no value.
  As in FlashAttention, the returned log-sum-exp includes the sink term.
* A query row with no allowed key outputs zeros; its lse is ``-inf``, or
  ``sinks[h]`` when sinks are given (the sink is then the only softmax column).
* MLA's ``qv`` adds ``qv @ v^T`` to the scores before scaling (default scale
  ``(D + Dv) ** -0.5``); fp8 inputs are scaled by ``q_descale * k_descale`` in the
  scores and ``v_descale`` in the output, per (sequence, kv head), and give a bfloat16
  ``out``: see :mod:`~kernel_fallback.integrations.flash_attn._mla_fp8`.
* Arithmetic is float32 (float64 when ``q`` is float64 or fp8); ``out`` has ``q``'s
  dtype (bfloat16 for fp8) and the lse is always float32, as in FA3.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from kernel_fallback.integrations.flash_attn import _mla_fp8
from kernel_fallback.integrations.flash_attn._checks import (
    WindowSize,
    check_cache_args,
    check_cache_layout,
    check_chunk,
    check_common,
    check_cu_seqlens,
    check_int32_vector,
    check_varlen_layout,
    check_window,
)
from kernel_fallback.integrations.flash_attn._kv_prep import KvExtras, plain_call
from kernel_fallback.integrations.flash_attn._mla_fp8 import (
    check_descales,
    check_qv,
    default_scale,
    result_dtype,
)

__all__ = ["WindowSize", "flash_attn_varlen_func", "flash_attn_with_kvcache"]


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    window: tuple[int, int],
    chunk: int,
    softcap: float,
    sinks: Tensor | None,
    dtype: torch.dtype,
    qv: Tensor | None = None,
    factors: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Attend one sequence: q (Lq, Hq, D), k (Lk, Hkv, D), v (Lk, Hkv, Dv).

    ``window`` is ``(left, right)`` with causal applied; ``chunk`` the attention chunk
    size, 0 for none. ``qv`` (Lq, Hq, Dv) adds ``qv @ v^T`` to the scores; ``factors``
    are the fp8 descale products per kv head, ``(q_descale * k_descale, v_descale)``.

    Returns ``out`` (Lq, Hq, Dv) and ``lse`` (Hq, Lq), both in ``dtype``.
    """
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    g = hq // hkv
    # (Hkv, G, Lq, D) x (Hkv, 1, D, Lk) -> (Hkv, G, Lq, Lk): no kv head replication.
    qh = q.to(dtype).reshape(lq, hkv, g, d).permute(1, 2, 0, 3)
    kh = k.to(dtype).permute(1, 2, 0).unsqueeze(1)
    vh = v.to(dtype).permute(1, 0, 2).unsqueeze(1)
    scores = torch.matmul(qh, kh)
    if qv is not None:  # MLA: the latent query against the values (which double as keys)
        qvh = qv.to(dtype).reshape(lq, hkv, g, -1).permute(1, 2, 0, 3)
        scores = scores + torch.matmul(qvh, vh.transpose(-1, -2))
    scores = scores * scale
    if factors is not None:
        scores = scores * factors[0].view(hkv, 1, 1, 1)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    left, right = window
    if left >= 0 or right >= 0 or chunk > 0:
        rows = torch.arange(lq, device=q.device).unsqueeze(1) + (lk - lq)
        cols = torch.arange(lk, device=q.device).unsqueeze(0)
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if right >= 0:
            allowed &= cols <= rows + right
        if left >= 0:
            allowed &= cols >= rows - left
        if chunk > 0:  # only keys of the query's own chunk, on both sides (FA3's mask.h)
            start = torch.div(rows, chunk, rounding_mode="floor") * chunk
            allowed &= (cols >= start) & (cols < start + chunk)
        scores = scores.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        sink_col = sinks.to(device=q.device, dtype=dtype).view(hkv, g, 1, 1).expand(hkv, g, lq, 1)
        lse = torch.logsumexp(torch.cat([scores, sink_col], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(scores, dim=-1)
    # Fully masked rows have lse == -inf and all scores -inf; exp(-inf - 0) == 0.
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - lse_safe.unsqueeze(-1))
    out = torch.matmul(probs, vh)
    if factors is not None:
        out = out * factors[1].view(hkv, 1, 1, 1)
    return out.reshape(hq, lq, -1).permute(1, 0, 2), lse.reshape(hq, lq)


def _factors(
    descales: tuple[Tensor | None, Tensor | None, Tensor | None],
    b: int,
    hkv: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor] | None:
    """Sequence ``b``'s ``(q_descale * k_descale, v_descale)`` per kv head; None without descales."""
    if all(t is None for t in descales):
        return None
    q_d, k_d, v_d = (
        torch.ones(hkv, dtype=dtype, device=device) if t is None else t[b].to(device=device, dtype=dtype)
        for t in descales
    )
    return q_d * k_d, v_d


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 and fp8 inputs (fp8 values are exact in it), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 or _mla_fp8.is_fp8(dtype) else torch.float32


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
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    attention_chunk: int | None = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    return_softmax_lse: bool = False,
    qv: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Variable-length (packed) attention, a reference for FA3's ``flash_attn_varlen_func``.

    Args:
        q: (total_q, Hq, D) packed queries of all sequences.
        k: (total_k, Hkv, D) packed keys; Hq must be a multiple of Hkv.
        v: (total_k, Hkv, Dv) packed values.
        cu_seqlens_q: (batch + 1,) int32 row offsets of each sequence in ``q``.
        cu_seqlens_k: (batch + 1,) int32 row offsets of each sequence in ``k``/``v``.
        max_seqlen_q: Launch hint in FA3; ignored here.
        max_seqlen_k: Launch hint in FA3; ignored here.
        seqused_q: Optional (batch,) int32; only the first ``seqused_q[b]`` query rows of
            sequence ``b`` are used (and define Lq for the causal alignment). The other
            rows, which FA3 leaves unwritten, get output 0 and lse ``-inf`` here.
        seqused_k: Optional (batch,) int32; only the first ``seqused_k[b]`` keys are used.
        softmax_scale: Score scale, default ``1 / sqrt(D)``.
        causal: Bottom-right aligned causal mask.
        window_size: (left, right) local window, -1 for unbounded.
        attention_chunk: Chunk size ``C`` of chunked local attention: query row ``i``,
            at position ``p = i + Lk - Lq``, sees only keys of its own chunk,
            ``(p // C) * C <= j < (p // C + 1) * C`` (on top of ``causal`` and
            ``window_size``). 0 or None turns it off.
        softcap: Apply ``softcap * tanh(s / softcap)`` to scaled scores when > 0.
        sinks: Optional (Hq,) per-head sink logits.
        return_softmax_lse: Also return the float32 log-sum-exp, shaped (Hq, total_q).
        qv: Optional (total_q, Hq, Dv) MLA query whose product with ``v`` joins the scores
            (default scale then ``(D + Dv) ** -0.5``); see
            :mod:`~kernel_fallback.integrations.flash_attn._mla_fp8`.
        q_descale: Optional (batch, Hkv) float32 fp8 descale of q (read for fp8 inputs only).
        k_descale: Likewise for k.
        v_descale: Likewise for v.

    Returns:
        ``out`` (total_q, Hq, Dv) in ``q``'s dtype (bfloat16 for fp8), or ``(out, lse)``.
    """
    del max_seqlen_q, max_seqlen_k  # grid-size hints for the CUDA kernel only
    check_varlen_layout(q, k, v)
    check_common(q, k, v, softcap, sinks)
    window = check_window(window_size, causal)
    chunk = check_chunk(attention_chunk)
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    cu_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    batch = len(cu_q) - 1
    if len(cu_k) != len(cu_q):
        raise ValueError(
            f"cu_seqlens_k has {len(cu_k)} entries but cu_seqlens_q has {len(cu_q)}; "
            "both must be batch_size + 1"
        )
    lens_q = [b - a for a, b in itertools.pairwise(cu_q)]
    lens_k = [b - a for a, b in itertools.pairwise(cu_k)]
    for name, used, spans in (("seqused_q", seqused_q, lens_q), ("seqused_k", seqused_k, lens_k)):
        if used is None:
            continue
        values = check_int32_vector(name, used, batch)
        if any(u < 0 or u > s for u, s in zip(values, spans, strict=True)):
            raise ValueError(f"{name} must lie in [0, sequence span {spans}], got {values}")
        spans[:] = values
    check_qv(q, qv, v.shape[-1])
    descales = check_descales(q, (q_descale, k_descale, v_descale), batch, k.shape[1])
    dtype = _compute_dtype(q.dtype)
    scale = softmax_scale if softmax_scale is not None else default_scale(q, qv)
    hq = q.shape[1]
    out = torch.zeros(q.shape[0], hq, v.shape[-1], dtype=result_dtype(q.dtype), device=q.device)
    lse = torch.full((hq, q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    for b in range(batch):
        q0, lq, k0, lk = cu_q[b], lens_q[b], cu_k[b], lens_k[b]
        if lq == 0:
            continue
        o, s = _attend(
            q[q0 : q0 + lq], k[k0 : k0 + lk], v[k0 : k0 + lk], scale, window, chunk, softcap, sinks, dtype,
            qv[q0 : q0 + lq] if qv is not None else None, _factors(descales, b, k.shape[1], dtype, q.device),
        )  # fmt: skip
        out[q0 : q0 + lq] = o.to(out.dtype)
        lse[:, q0 : q0 + lq] = s.float()
    return (out, lse) if return_softmax_lse else out


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    cache_seqlens: Tensor | int | None = None,
    page_table: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    max_seqlen_q: int | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    attention_chunk: int | None = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    return_softmax_lse: bool = False,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    rotary_seqlens: Tensor | None = None,
    rotary_interleaved: bool = True,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    cu_seqlens_k_new: Tensor | None = None,
    qv: Tensor | None = None,
    q_descale: Tensor | None = None,
    k_descale: Tensor | None = None,
    v_descale: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over a (optionally paged) KV cache, a reference for FA3's ``flash_attn_with_kvcache``.

    Args:
        q: (B, Sq, Hq, D), or (total_q, Hq, D) packed when ``cu_seqlens_q`` is given.
        k_cache: (B, S_cache, Hkv, D), or (num_blocks, page_size, Hkv, D) with ``page_table``.
        v_cache: Same layout as ``k_cache`` with head dim Dv.
        k: Optional (B, Sk_new, Hkv, D) new keys, written in place into ``k_cache`` at
            positions ``cache_seqlens[b] .. cache_seqlens[b] + Sk_new - 1``.
        v: Optional (B, Sk_new, Hkv, Dv) new values, written likewise into ``v_cache``.
        cache_seqlens: (B,) int32 tensor or an int: tokens already in the cache. Defaults
            to the full cache capacity. It is not updated after appending.
        page_table: Optional (B, max_blocks_per_seq) int32 logical -> physical block map.
        cu_seqlens_q: Optional (B + 1,) int32 offsets of each sequence in packed ``q``.
        max_seqlen_q: Launch hint in FA3; with rotary and packed ``q`` it also decides, as
            FA3's window normalization, whether a right window side covers every row.
        softmax_scale: Score scale, default ``1 / sqrt(D)``.
        causal: Bottom-right aligned causal mask (Lq = query length, Lk = keys used).
        window_size: (left, right) local window, -1 for unbounded.
        attention_chunk: Chunk size ``C`` of chunked local attention: query row ``i``,
            at position ``p = i + Lk - Lq``, sees only keys of its own chunk,
            ``(p // C) * C <= j < (p // C + 1) * C`` (on top of ``causal`` and
            ``window_size``). 0 or None turns it off.
        softcap: Apply ``softcap * tanh(s / softcap)`` to scaled scores when > 0.
        sinks: Optional (Hq,) per-head sink logits.
        return_softmax_lse: Also return the float32 lse, shaped (B, Hq, Sq), or
            (Hq, total_q) for packed ``q``.
        rotary_cos: Optional (seqlen_ro, rotary_dim / 2) in q's dtype, with ``rotary_sin``:
            rotary embedding of q and the new keys (new keys required).
        rotary_sin: Same shape as ``rotary_cos``.
        rotary_seqlens: Optional (B,) int32 rotary start positions (default ``cache_seqlens``).
        rotary_interleaved: Rotate pairs (0, 1), (2, 3)... (True) or GPT-NeoX halves.
        cache_batch_idx: Optional (B,) int32: the cache row (``page_table`` row) of each sequence.
        cache_leftpad: Optional (B,) int32: the first cache position of each sequence's keys.
        cu_seqlens_k_new: Optional (B + 1,) int32 offsets of packed new keys ``k``/``v``
            (total_new, Hkv, D[v]); ignored without ``k``.

    The last seven follow FA3 as
    :mod:`~kernel_fallback.integrations.flash_attn._kv_prep` documents (with its sources).
        qv: Optional MLA query shaped like ``q`` with head dim Dv, whose product with the
            values joins the scores (default scale then ``(D + Dv) ** -0.5``); see
            :mod:`~kernel_fallback.integrations.flash_attn._mla_fp8`.
        q_descale: Optional (B, Hkv) float32 fp8 descale of q (read for fp8 inputs only).
        k_descale: Likewise for the keys.
        v_descale: Likewise for the values.

    Returns:
        ``out`` shaped like ``q`` with head dim Dv, in ``q``'s dtype (bfloat16 for fp8),
        or ``(out, lse)``.
    """
    varlen_q = cu_seqlens_q is not None
    check_cache_layout(q, k_cache, v_cache, cu_seqlens_q)
    check_common(q, k_cache, v_cache, softcap, sinks, "k_cache and v_cache")
    window = check_window(window_size, causal)
    chunk = check_chunk(attention_chunk)
    extras = KvExtras(
        rotary_cos,
        rotary_sin,
        rotary_seqlens,
        rotary_interleaved,
        cache_batch_idx,
        cache_leftpad,
        cu_seqlens_k_new,
    )
    plain = plain_call(
        q, k_cache, v_cache, k, v, cache_seqlens, page_table, cu_seqlens_q, max_seqlen_q, causal, window,
        chunk, extras, check_values=True,
    )  # fmt: skip
    q, k, v, cache_seqlens, page_table = plain.q, plain.k, plain.v, plain.cache_seqlens, plain.page_table
    batch, s_new = check_cache_args(q, k_cache, v_cache, k, v, page_table, cu_seqlens_q, cache_seqlens)
    if cu_seqlens_q is not None:
        cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    else:
        sq = q.shape[1]
        cu_q = [b * sq for b in range(batch + 1)]
    if page_table is not None:
        page_size = k_cache.shape[1]
        capacity = page_table.shape[1] * page_size
        blocks = page_table.to(device=k_cache.device, dtype=torch.long)
        if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= k_cache.shape[0]):
            raise ValueError(f"page_table entries must lie in [0, {k_cache.shape[0]}) (num_blocks)")
    else:
        capacity = k_cache.shape[1]
    if cache_seqlens is None:
        cached = [capacity] * batch
    elif isinstance(cache_seqlens, int):
        cached = [cache_seqlens] * batch
    else:
        cached = check_int32_vector("cache_seqlens", cache_seqlens, batch)
    check_qv(q, qv, v_cache.shape[-1])
    descales = check_descales(q, (q_descale, k_descale, v_descale), batch, k_cache.shape[2])
    if any(c < 0 or c + s_new > capacity for c in cached):
        raise ValueError(
            f"cache_seqlens + Sk_new ({s_new}) must lie in [0, {capacity}] (cache capacity), "
            f"got cache_seqlens {cached}"
        )

    def positions(b: int, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Return (first-dim, second-dim) cache indices of logical positions [start, stop)."""
        pos = torch.arange(start, stop, device=k_cache.device)
        if page_table is None:
            return torch.full_like(pos, b), pos
        return blocks[b, pos // page_size], pos % page_size

    if k is not None and v is not None and s_new > 0:
        for b in range(batch):
            idx = positions(b, cached[b], cached[b] + s_new)
            k_cache[idx] = k[b].to(device=k_cache.device, dtype=k_cache.dtype)
            v_cache[idx] = v[b].to(device=v_cache.device, dtype=v_cache.dtype)

    starts: list[int] = plain.key_start.tolist() if plain.key_start is not None else [0] * batch
    dtype = _compute_dtype(q.dtype)
    scale = softmax_scale if softmax_scale is not None else default_scale(q, qv)
    hq = q.shape[-2]
    q_rows = q if varlen_q else q.reshape(-1, hq, q.shape[-1])
    qv_rows = qv.reshape(q_rows.shape[0], hq, -1) if qv is not None else None
    out = torch.zeros(q_rows.shape[0], hq, v_cache.shape[-1], dtype=result_dtype(q.dtype), device=q.device)
    lse = torch.full((hq, q_rows.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    for b in range(batch):
        q0, q1 = cu_q[b], cu_q[b + 1]
        if q1 == q0:
            continue
        idx = positions(b, starts[b], cached[b] + s_new)
        o, s = _attend(
            q_rows[q0:q1], k_cache[idx], v_cache[idx], scale, window, chunk, softcap, sinks, dtype,
            qv_rows[q0:q1] if qv_rows is not None else None,
            _factors(descales, b, k_cache.shape[2], dtype, q.device),
        )  # fmt: skip
        out[q0:q1] = o.to(device=q.device, dtype=out.dtype)
        lse[:, q0:q1] = s.to(device=q.device, dtype=torch.float32)
    if not varlen_q:  # explicit sizes: with Sq == 0 a -1 would be ambiguous
        out = out.reshape(*q.shape[:3], v_cache.shape[-1])
        lse = lse.reshape(hq, batch, q.shape[1]).permute(1, 0, 2).contiguous()
    return (out, lse) if return_softmax_lse else out
