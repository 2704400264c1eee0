"""FA3's kvcache extras turned into a plain cache call: rotary, batch index, leftpad, packed appends.

Both kvcache providers (the exact reference and the fast ``torch`` one) call
:func:`plain_call` first; what it returns is a call they already serve (rotated ``q``,
``cache_batch_idx`` folded into a page table, packed appends written) plus one extra: the
first key of each sequence (``cache_leftpad``). Upstream facts it follows
(Dao-AILab/flash-attention, ``hopper/``):

* ``cache_seqlens`` counts the left padding: it is the end of the cache keys, so the
  keys of sequence ``b`` are cache positions ``[cache_leftpad[b], cache_seqlens[b] +
  new[b])`` (``seqlen.h``: ``seqlen_k_og = seqused_k - leftpad_k``, ``offset_k =
  leftpad_k``; ``test_util.py`` ``attention_ref(key_leftpad=)``: ``col - leftpad``
  against ``sk = keys used``). New keys are appended at ``cache_seqlens[b]`` (an
  absolute position, not moved by the padding). Masks are computed over those keys
  alone: bottom-right causal / window / chunk with ``Lk = end - leftpad``, the chunk
  grid starting at the leftpad.
* ``cache_batch_idx[b]`` is the cache row (the ``page_table`` row with a page table) of
  query batch ``b`` (``mainloop_fwd_sm90_tma_gmma_ws.hpp``: ``bidb_kv =
  kv_batch_idx[bidb]``); ``cache_seqlens``, ``cache_leftpad`` and ``rotary_seqlens``
  stay indexed by ``b``. A contiguous cache is a paged one with one page per row, so the
  index folds into a ``(B, 1)`` page table (or selects rows of ``page_table``).
* ``cu_seqlens_k_new`` packs the new keys: ``k`` (total_new, Hkv, D), ``v`` (total_new,
  Hkv, Dv), sequence ``b`` owning rows ``cu[b] .. cu[b + 1] - 1`` (``flash_api.cpp``
  ``CHECK_SHAPE(k_new, total_k_new, ...)``); without new keys FA3 never reads it.
* Rotary (``rotary_cos``/``rotary_sin`` (seqlen_ro, rotary_dim / 2), ``q``'s dtype) needs
  new keys (``flash_api.cpp``: "If rotary cos/sin are provided, new key / value ... must
  also be provided"; any ``rotary_dim <= D`` is taken here, FA3 wants a multiple of 16)
  and rotates the first ``rotary_dim`` features, the rest pass through
  (``flash_attn/layers/rotary.py``): interleaved pairs ``(0, 1), (2, 3)...``, otherwise
  GPT-NeoX halves ``(i, i + rotary_dim / 2)``; ``x1 cos - x2 sin``, ``x1 sin + x2 cos`` in
  float32, rounded to the input dtype (``hopper/rotary.h``). The start position is
  ``rotary_seqlens[b]`` when given, else ``cache_seqlens[b]`` (``seqlen.h``:
  ``seqlen_rotary = seqlen_k_og + leftpad_k``, the leftpad included). New key ``j`` is at
  start + ``j``; query row ``i`` is at start + ``i`` when the kernel is causal or local,
  else every row is at start (``FixedPosition = !(Is_causal || Is_local)``). Local means a
  window side or ``attention_chunk`` left after ``flash_api.cpp``'s normalization (a left
  side ``>= seqlen_k - 1`` or right side ``>= seqlen_q - 1`` becomes unbounded; seqlen_k
  is the cache capacity, seqlen_q ``q``'s length or ``max_seqlen_q`` for packed ``q``).

Appends are written in place into the caller's ``k_cache``/``v_cache`` (through
``page_table``), as FA3 does; :func:`append_in_place` writes a plain call's ``(B, Sk_new)``
append for the fast provider. With ``check_values`` (the reference) every value is
validated on the host first; without it (the fast provider) nothing is read on the host.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernel_fallback.integrations.flash_attn._checks import check_cache_layout

__all__ = ["KvExtras", "PlainCall", "append_in_place", "cache_rows", "packed_rows", "plain_call"]


@dataclass(frozen=True)
class KvExtras:
    """FA3's kvcache arguments that :func:`plain_call` turns into a plain call."""

    rotary_cos: Tensor | None = None
    rotary_sin: Tensor | None = None
    rotary_seqlens: Tensor | None = None
    rotary_interleaved: bool = True
    cache_batch_idx: Tensor | None = None
    cache_leftpad: Tensor | None = None
    cu_seqlens_k_new: Tensor | None = None


@dataclass(frozen=True)
class PlainCall:
    """A call without the extras; ``key_start`` (B,) is the first key (``cache_leftpad``) or None."""

    q: Tensor
    k: Tensor | None
    v: Tensor | None
    cache_seqlens: Tensor | int | None
    page_table: Tensor | None
    key_start: Tensor | None


def _int32_vector(name: str, t: object, length: int) -> Tensor:
    if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.shape != (length,):
        got = f"dtype {t.dtype} and shape {tuple(t.shape)}" if isinstance(t, Tensor) else repr(t)
        raise ValueError(f"{name} must be an int32 tensor of shape ({length},), got {got}")
    return t


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` features of x (N, H, D) by cos/sin (N, rd/2)."""
    half = cos.shape[-1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    c, s = cos.to(compute).unsqueeze(1), sin.to(compute).unsqueeze(1)
    head = x[..., : 2 * half].to(compute)
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = head[..., :half], head[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half :]), dim=-1)


def packed_rows(cu: Tensor, total: int, lens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """For each of ``total`` packed rows: its sequence by ``cu``, its index in it, and whether it is used.

    A row is used when it lies within its sequence's first ``lens[b]`` rows (default: the
    whole sequence ``cu[b] .. cu[b + 1] - 1``; ``seqused_q`` passes fewer).
    """
    cu = cu.to(dtype=torch.long)
    rows = torch.arange(total, device=cu.device)
    doc = torch.searchsorted(cu[1:], rows, right=True).clamp_max(cu.shape[0] - 2)
    pos = rows - cu[doc]
    if lens is None:
        lens = cu[1:] - cu[:-1]
    return doc, pos, (pos >= 0) & (pos < lens[doc])


def _q_rows_move(
    causal: bool, window: tuple[int, int], chunk: int, seqlen_q: int | None, seqlen_k: int
) -> bool:
    """Whether rotary puts query row i at start + i (FA3's causal or local kernels) or all at start."""
    left, right = window
    if left >= seqlen_k - 1:
        left = -1
    if seqlen_q is not None and right >= seqlen_q - 1:
        right = -1
    return causal or left >= 0 or right >= 0 or chunk > 0


def _check_shapes(
    q: Tensor, k_cache: Tensor, k: Tensor | None, v: Tensor | None, batch: int, x: KvExtras
) -> None:
    """Shape and dtype checks of the extras (no value is read)."""
    for name in ("cache_batch_idx", "cache_leftpad"):
        if getattr(x, name) is not None:
            _int32_vector(name, getattr(x, name), batch)
    if (x.rotary_cos is None) != (x.rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together (both or neither)")
    if x.rotary_cos is not None and x.rotary_sin is not None:
        if k is None:
            raise ValueError(
                "rotary_cos/rotary_sin need new keys k and v: FA3 applies rotary only while appending"
            )
        cos, sin = x.rotary_cos, x.rotary_sin
        if cos.dim() != 2 or sin.shape != cos.shape or 2 * cos.shape[1] > q.shape[-1]:
            raise ValueError(
                f"rotary_cos and rotary_sin must both have shape (seqlen_ro, rotary_dim / 2) with "
                f"rotary_dim <= head dim {q.shape[-1]}, got {tuple(cos.shape)} and {tuple(sin.shape)}"
            )
        if cos.dtype != q.dtype or sin.dtype != q.dtype:
            raise ValueError(
                f"rotary_cos and rotary_sin must have q's dtype {q.dtype}, got {cos.dtype} and {sin.dtype}"
            )
        if x.rotary_seqlens is not None:
            _int32_vector("rotary_seqlens", x.rotary_seqlens, batch)
    if k is None or v is None or x.cu_seqlens_k_new is None:
        return
    _int32_vector("cu_seqlens_k_new", x.cu_seqlens_k_new, batch + 1)
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    if k.dim() != 3 or k.shape[1:] != (hkv, d):
        raise ValueError(
            f"k must have shape (total_new, {hkv}, {d}) with cu_seqlens_k_new, got {tuple(k.shape)}"
        )
    if v.dim() != 3 or v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"v must have shape ({k.shape[0]}, {hkv}, Dv) with cu_seqlens_k_new, got {tuple(v.shape)}"
        )


def _check_values(
    cached: Tensor,
    new_len: Tensor,
    q_len: Tensor,
    capacity: int,
    cache_rows: int,
    x: KvExtras,
    rot_start: Tensor,
    q_moves: bool,
    total_new: int | None,
) -> None:
    """The reference's host checks of every value the extras bring, before anything is written."""
    if x.cu_seqlens_k_new is not None and total_new is not None:
        cu = x.cu_seqlens_k_new.tolist()
        if cu[0] < 0 or any(b < a for a, b in itertools.pairwise(cu)) or cu[-1] > total_new:
            raise ValueError(
                f"cu_seqlens_k_new must be non-decreasing within [0, {total_new}] (the rows of k), got {cu}"
            )
    if x.cache_batch_idx is not None:
        idx = x.cache_batch_idx.tolist()
        if any(i < 0 or i >= cache_rows for i in idx):
            raise ValueError(f"cache_batch_idx entries must lie in [0, {cache_rows}) (cache rows), got {idx}")
    ends = (cached + new_len).tolist()
    if any(c < 0 for c in cached.tolist()) or any(e > capacity for e in ends):
        raise ValueError(
            f"cache_seqlens + new keys must lie in [0, {capacity}] (cache capacity), got "
            f"cache_seqlens {cached.tolist()} and new keys {new_len.tolist()}"
        )
    if x.cache_leftpad is not None:
        pad = x.cache_leftpad.tolist()
        if any(p < 0 or p > c for p, c in zip(pad, cached.tolist(), strict=True)):
            raise ValueError(f"cache_leftpad must lie in [0, cache_seqlens {cached.tolist()}], got {pad}")
    if x.rotary_cos is not None:
        seqlen_ro = x.rotary_cos.shape[0]
        span = torch.maximum(new_len, q_len if q_moves else q_len.clamp_max(1))
        starts = rot_start.tolist()
        if any(s < 0 or (n > 0 and s + n > seqlen_ro) for s, n in zip(starts, span.tolist(), strict=True)):
            raise ValueError(
                f"rotary positions run past rotary_cos/rotary_sin ({seqlen_ro} rows): starts {starts} "
                f"(rotary_seqlens, else cache_seqlens) for {span.tolist()} positions"
            )


def plain_call(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    cache_seqlens: Tensor | int | None,
    page_table: Tensor | None,
    cu_seqlens_q: Tensor | None,
    max_seqlen_q: int | None,
    causal: bool,
    window: tuple[int, int],
    chunk: int,
    extras: KvExtras,
    *,
    check_values: bool,
) -> PlainCall:
    """The plain call equivalent to a call with ``extras``; writes packed appends in place.

    ``window`` is ``(left, right)`` with causal applied and ``chunk`` the attention chunk
    (0 for none), as the providers validated them. Returns the inputs unchanged when no
    extra means anything (rotary, batch index, leftpad, or packed new keys).
    """
    x = extras
    packed = x.cu_seqlens_k_new is not None and k is not None
    if (
        x.rotary_cos is None
        and x.rotary_sin is None
        and x.cache_batch_idx is None
        and x.cache_leftpad is None
        and not packed
    ):
        return PlainCall(q, k, v, cache_seqlens, page_table, None)
    check_cache_layout(q, k_cache, v_cache, cu_seqlens_q)
    if cu_seqlens_q is not None:
        if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 2:
            raise ValueError(
                f"cu_seqlens_q must be a 1-D int32 tensor of batch_size + 1 >= 2 entries, got dtype "
                f"{cu_seqlens_q.dtype} and shape {tuple(cu_seqlens_q.shape)}"
            )
        batch = cu_seqlens_q.shape[0] - 1
    else:
        batch = q.shape[0]
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (both or neither)")
    _check_shapes(q, k_cache, k, v, batch, x)
    dev = k_cache.device
    page = k_cache.shape[1]
    if page_table is not None and (page_table.dtype != torch.int32 or page_table.dim() != 2):
        raise ValueError(
            f"page_table must be a 2-D int32 tensor, got dtype {page_table.dtype} and shape "
            f"{tuple(page_table.shape)}"
        )
    capacity = page_table.shape[1] * page if page_table is not None else page
    cache_rows = page_table.shape[0] if page_table is not None else k_cache.shape[0]

    if isinstance(cache_seqlens, Tensor):
        cached = _int32_vector("cache_seqlens", cache_seqlens, batch).to(device=dev, dtype=torch.long)
    else:
        cached = torch.full((batch,), capacity if cache_seqlens is None else cache_seqlens, device=dev)
    if k is None:
        new_len = torch.zeros(batch, dtype=torch.long, device=dev)
    elif packed and x.cu_seqlens_k_new is not None:
        cu_new = x.cu_seqlens_k_new.to(device=dev, dtype=torch.long)
        new_len = cu_new[1:] - cu_new[:-1]
    else:
        new_len = torch.full((batch,), k.shape[1], device=dev)
    if cu_seqlens_q is not None:
        cu_q = cu_seqlens_q.to(device=dev, dtype=torch.long)
        q_len = cu_q[1:] - cu_q[:-1]
        seqlen_q = max_seqlen_q
    else:
        q_len = torch.full((batch,), q.shape[1], device=dev)
        seqlen_q = q.shape[1]
    q_moves = _q_rows_move(causal, window, chunk, seqlen_q, capacity)
    rot_start = cached
    if x.rotary_seqlens is not None and x.rotary_cos is not None:
        rot_start = x.rotary_seqlens.to(device=dev, dtype=torch.long)
    if check_values:
        total_new = k.shape[0] if packed and k is not None else None
        _check_values(cached, new_len, q_len, capacity, cache_rows, x, rot_start, q_moves, total_new)

    if x.cache_batch_idx is not None:
        idx = x.cache_batch_idx.to(device=dev)
        if page_table is not None:
            page_table = page_table.to(device=dev)[idx.long()]
        else:  # a contiguous cache row is one page of the whole capacity
            page_table = idx.to(torch.int32).view(batch, 1)

    if x.rotary_cos is not None and x.rotary_sin is not None and k is not None:
        cos, sin = x.rotary_cos.to(dev), x.rotary_sin.to(dev)
        q, k = _rotary(q, k, cos, sin, x, rot_start, cu_seqlens_q, packed, q_moves)

    if packed and k is not None and v is not None and x.cu_seqlens_k_new is not None:
        _append_packed(k_cache, v_cache, k, v, x.cu_seqlens_k_new, cached, page_table)
        return PlainCall(q, None, None, (cached + new_len).to(torch.int32), page_table, x.cache_leftpad)
    return PlainCall(q, k, v, cache_seqlens, page_table, x.cache_leftpad)


def _rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    x: KvExtras,
    start: Tensor,
    cu_seqlens_q: Tensor | None,
    packed: bool,
    q_moves: bool,
) -> tuple[Tensor, Tensor]:
    """q and the new keys rotated at their FA3 positions (see the module docstring)."""
    dev = cos.device

    def positions(doc: Tensor, pos: Tensor, valid: Tensor) -> Tensor:
        # Rows outside every sequence are never attended (or written): any in-range position.
        return torch.where(valid, start.to(doc.device)[doc] + pos, 0).to(dev)

    def rotated(t: Tensor, pos: Tensor) -> Tensor:
        """``t``, packed (N, H, D) or (B, S, H, D), its rows rotated at ``pos`` (N or B * S,)."""
        flat = t.reshape(pos.shape[0], *t.shape[-2:])
        return _rotate(flat, cos[pos].to(t.device), sin[pos].to(t.device), x.rotary_interleaved).view_as(t)

    if packed and x.cu_seqlens_k_new is not None:
        k_pos = positions(*packed_rows(x.cu_seqlens_k_new.to(dev), k.shape[0]))
    else:
        batch, s_new = k.shape[:2]
        k_pos = (start.view(batch, 1) + torch.arange(s_new, device=dev)).reshape(-1)
    if cu_seqlens_q is not None:
        doc, pos, valid = packed_rows(cu_seqlens_q.to(dev), q.shape[0])
        q_pos = positions(doc, pos if q_moves else torch.zeros_like(pos), valid)
    else:
        batch, sq = q.shape[:2]
        rows = torch.arange(sq, device=dev) if q_moves else torch.zeros(sq, dtype=torch.long, device=dev)
        q_pos = (start.view(batch, 1) + rows).reshape(-1)
    k_rot = rotated(k, k_pos)
    return rotated(q, q_pos), k_rot


def _append_packed(
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_k_new: Tensor,
    cached: Tensor,
    page_table: Tensor | None,
) -> None:
    """Write packed new keys/values at ``cache_seqlens[b] + j`` in place, without a host read."""
    total = k.shape[0]
    if total == 0 or k_cache.shape[1] == 0 or k_cache.shape[0] == 0:
        return
    dev = k_cache.device
    cu = cu_seqlens_k_new.to(device=dev, dtype=torch.long)
    doc, pos, valid = packed_rows(cu, total)
    # index_put_ cannot skip rows without reading how many there are on the host, so a row
    # outside every sequence repeats the write of the last valid row (same slot, same
    # value: deterministic), or, when no row is valid, writes slot (0, 0) back unchanged.
    any_valid = cu[-1] > cu[0]
    src = torch.where(valid, torch.arange(total, device=dev), (cu[-1] - 1).clamp(0, total - 1))
    slot = cached[doc[src]] + pos[src]
    if page_table is not None:
        page = k_cache.shape[1]
        pages = page_table.to(device=dev, dtype=torch.long)
        first = pages[doc[src], (slot // page).clamp(0, pages.shape[1] - 1)]
        second = slot % page
    else:
        first, second = doc[src], slot
    zero = torch.zeros((), dtype=torch.long, device=dev)
    index = (torch.where(any_valid, first, zero), torch.where(any_valid, second, zero))
    for cache, new in ((k_cache, k), (v_cache, v)):
        values = new.to(device=dev, dtype=cache.dtype)[src]
        values = torch.where(any_valid, values, cache[0, 0])
        cache.index_put_(index, values)


def cache_rows(
    cache_seqlens: Tensor | int | None,
    page_table: Tensor | None,
    batch: int,
    capacity: int,
    dev: torch.device,
) -> tuple[Tensor, Tensor | None]:
    """Cached lengths (B,) and the page table as long tensors on the cache's device."""
    if isinstance(cache_seqlens, Tensor):
        cached = cache_seqlens.to(device=dev, dtype=torch.long)
    else:
        cached = torch.full((batch,), capacity if cache_seqlens is None else cache_seqlens, device=dev)
    blocks = page_table.to(device=dev, dtype=torch.long) if page_table is not None else None
    return cached, blocks


def append_in_place(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cached: Tensor, blocks: Tensor | None
) -> None:
    """Write the new keys and values into the cache in place, at each sequence's ``cached`` length."""
    dev, page = k_cache.device, k_cache.shape[1]
    pos = cached.unsqueeze(1) + torch.arange(k.shape[1], device=dev)  # (B, Sk_new)
    if blocks is not None:
        index = (blocks.gather(1, pos // page), pos % page)
    else:
        index = (torch.arange(k.shape[0], device=dev).unsqueeze(1).expand_as(pos), pos)
    k_cache.index_put_(index, k.to(device=dev, dtype=k_cache.dtype))
    v_cache.index_put_(index, v.to(device=dev, dtype=v_cache.dtype))
