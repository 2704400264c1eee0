"""Attention masks as per-query key intervals, built on the device without host reads.

Every mask FA3 supports (packed varlen documents, bottom-right causal, sliding window,
``attention_chunk``, ``seqused_*``, cache lengths) leaves each query row a contiguous
range of allowed keys ``[lo, hi)``: the intersection of intervals is an interval. So
one ``mask_mod`` serves every case, ``lo[q] <= kv < hi[q]``, and the block-sparse
structure for ``flex_attention`` follows exactly from per-block minima and maxima of
``lo``/``hi`` (no dense Lq x Lk mask is ever built). Rows with no key get ``lo = hi``.

Block masks are cached per batch layout (the identity and version of the tensors that
define it, plus the mask parameters), so the layers of one forward pass build it once.
A backward pass needs the mask's q-block indices as well (flex's dK/dV loop walks the
q blocks of each kv block); they are built only for calls that ask for them.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

__all__ = ["MaskSpec", "block_mask_for", "cache_clear", "row_intervals"]

#: flex_attention's default tile; a decode query (a few rows) pads one q block.
BLOCK = 128
_CACHE_SIZE = 16
_BIG = 1 << 40


@dataclass(frozen=True)
class MaskSpec:
    """Mask parameters shared by every row: ``right``/``left`` are -1 when unbounded."""

    left: int
    right: int
    chunk: int


def row_intervals(
    pos_q: Tensor, len_q: Tensor, len_k: Tensor, valid: Tensor, spec: MaskSpec
) -> tuple[Tensor, Tensor]:
    """Allowed keys ``[lo, hi)`` of each query row, in the row's own key coordinates.

    ``pos_q`` is the row's index within its sequence, ``len_q``/``len_k`` that
    sequence's query and key lengths (all int64, same shape); ``valid`` marks rows that
    belong to a sequence. Alignment is bottom-right: row ``i`` sits at key ``i + Lk - Lq``.
    """
    diag = pos_q + len_k - len_q
    lo = torch.zeros_like(diag)
    hi = len_k.clone()
    if spec.right >= 0:
        hi = torch.minimum(hi, diag + spec.right + 1)
    if spec.left >= 0:
        lo = torch.maximum(lo, diag - spec.left)
    if spec.chunk > 0:  # FA3 keeps a query inside its own chunk on both sides
        start = torch.div(diag, spec.chunk, rounding_mode="floor") * spec.chunk
        lo = torch.maximum(lo, start)
        hi = torch.minimum(hi, start + spec.chunk)
    empty = ~valid | (hi <= lo)
    return lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)


def _interval_mask_mod(lo: Tensor, hi: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """``mask_mod`` for intervals shaped (B, Lq_padded); B is 1 for a packed batch."""
    if lo.shape[0] > 1:

        def interval_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            del h
            return (kv_idx >= lo[b, q_idx]) & (kv_idx < hi[b, q_idx])

        return interval_mask
    # One row of intervals: index a 1-D view with q_idx alone. A Python 0 as the row index
    # becomes a host-to-device copy when flex traces the mask, which CUDA graph capture
    # refuses (seen on an H100 for packed queries over a cache).
    lo_row, hi_row = lo[0], hi[0]

    def packed_interval_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        del b, h
        return (kv_idx >= lo_row[q_idx]) & (kv_idx < hi_row[q_idx])

    return packed_interval_mask


def _build(lo: Tensor, hi: Tensor, kv_len: int, q_block: int, q_blocks: bool = False) -> BlockMask:
    """The flex BlockMask of intervals ``lo``/``hi`` shaped (B, Lq) over ``kv_len`` keys.

    ``q_blocks``: also build the q-block indices (the transpose), which flex's backward needs.
    """
    batch, q_len = lo.shape
    n_q = -(-q_len // q_block)
    n_kv = max(1, -(-kv_len // BLOCK))
    pad = n_q * q_block - q_len
    empty = hi <= lo
    # Which kv blocks a q block touches at all (union of its rows' intervals) ...
    u_lo = torch.nn.functional.pad(lo.masked_fill(empty, _BIG), (0, pad), value=_BIG)
    u_hi = torch.nn.functional.pad(hi.masked_fill(empty, -1), (0, pad), value=-1)
    blk_lo = u_lo.view(batch, n_q, q_block).amin(-1, keepdim=True)
    blk_hi = u_hi.view(batch, n_q, q_block).amax(-1, keepdim=True)
    # ... and which it covers for every row (padding rows constrain nothing).
    f_lo = torch.nn.functional.pad(lo.masked_fill(empty, _BIG), (0, pad), value=0)
    f_hi = torch.nn.functional.pad(hi.masked_fill(empty, -1), (0, pad), value=_BIG)
    all_lo = f_lo.view(batch, n_q, q_block).amax(-1, keepdim=True)
    all_hi = f_hi.view(batch, n_q, q_block).amin(-1, keepdim=True)
    start = torch.arange(n_kv, device=lo.device) * BLOCK
    stop = start + BLOCK
    touched = (blk_lo < stop) & (blk_hi > start)
    # A block past the end of the keys stays partial: the mask then bounds it.
    full = (all_lo <= start) & (all_hi >= stop) & (stop <= kv_len)
    partial = touched & ~full

    def ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
        count = blocks.sum(-1, dtype=torch.int32)
        order = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices
        return count.unsqueeze(1), order.to(torch.int32).unsqueeze(1)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(q_block, BLOCK),
        # Padded so that the kernel's rows past Lq index inside the tensors (and see nothing).
        mask_mod=_interval_mask_mod(
            torch.nn.functional.pad(lo, (0, pad)), torch.nn.functional.pad(hi, (0, pad))
        ),
        seq_lengths=(q_len, kv_len),
        compute_q_blocks=q_blocks,
    )


@dataclass
class _Entry:
    refs: tuple[weakref.ref[Tensor], ...]
    versions: tuple[int, ...]
    mask: BlockMask


_cache: OrderedDict[Hashable, _Entry] = OrderedDict()


def cache_clear() -> None:
    """Forget every cached block mask."""
    _cache.clear()


def block_mask_for(
    layout: tuple[Tensor | None, ...],
    params: Hashable,
    build: Callable[[], tuple[Tensor, Tensor]],
    kv_len: int,
    *,
    reuse: bool = True,
    q_blocks: bool = False,
) -> BlockMask:
    """The BlockMask of the intervals ``build()`` returns, cached per batch layout.

    ``layout`` are the tensors whose values define the intervals (cu_seqlens, seqused,
    cache_seqlens...), ``params`` everything else they depend on (shapes, mask spec).
    An entry is reused while the same tensor objects are alive and unmodified (their
    version counter unchanged), as in the layers of one forward pass.

    With ``reuse=False`` (while a CUDA graph is being captured) the mask is built anew
    and not cached: a replay must recompute it from the values then in the layout
    tensors, which Python never sees change.

    ``q_blocks=True`` (a call whose result will be differentiated) builds the q-block
    indices too; such a mask is cached apart from the forward-only one.
    """
    if not reuse:
        lo, hi = build()
        return _build(lo, hi, kv_len, BLOCK, q_blocks)
    present = tuple(t for t in layout if t is not None)
    key = (tuple(id(t) for t in present), tuple(t is None for t in layout), params, q_blocks)
    entry = _cache.get(key)
    versions = tuple(t._version for t in present)
    if (
        entry is not None
        and all(ref() is t for ref, t in zip(entry.refs, present, strict=True))
        and entry.versions == versions
    ):
        _cache.move_to_end(key)
        return entry.mask
    lo, hi = build()
    mask = _build(lo, hi, kv_len, BLOCK, q_blocks)
    _cache[key] = _Entry(tuple(weakref.ref(t) for t in present), versions, mask)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return mask
