"""Argument checks of the FA3 entry points, shared by the reference and the ``torch`` provider.

Both providers raise the same ValueError for the same malformed call. The checks look at
shapes, dtypes and options only, so the fast provider reads nothing on the host through
them (a ``window_size`` given as tensors excepted: its two sides are read), except
:func:`check_int32_vector` and :func:`check_cu_seqlens`, which return the values for the
reference, the one provider that reads them.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

__all__ = [
    "WindowSize",
    "check_cache_args",
    "check_cache_layout",
    "check_chunk",
    "check_common",
    "check_cu",
    "check_cu_seqlens",
    "check_int32_shape",
    "check_int32_vector",
    "check_varlen_layout",
    "check_window",
]

#: What ``window_size`` may be: a pair of ints, a pair of 0-d integer tensors, or a
#: 2-element integer tensor.
WindowSize = tuple[int, int] | tuple[Tensor, Tensor] | Tensor


def _window_side(value: object) -> int | None:
    """One side of ``window_size`` as an int, or None when it is not an integer."""
    if isinstance(value, Tensor):
        # Upstream's tests pass 0-d (or one-element) integer tensors; FA3 accepts them.
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            return None
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def check_window(window_size: object, causal: bool) -> tuple[int, int]:
    """Validate ``window_size`` and return ``(left, right)`` with causal applied.

    Accepts a pair of ints, a pair of 0-d integer tensors, or a 2-element integer tensor.
    """
    sides: list[object]
    if isinstance(window_size, Tensor):
        sides = list(window_size.reshape(-1)) if window_size.dim() == 1 else [window_size]
    elif isinstance(window_size, tuple | list):
        sides = list(window_size)
    else:
        sides = [window_size]
    ints = [_window_side(w) for w in sides]
    if len(ints) != 2 or any(w is None or w < -1 for w in ints):
        raise ValueError(
            f"window_size must be a pair of ints >= -1 (-1 = unbounded), or of 0-d integer "
            f"tensors, got {window_size!r}"
        )
    left, right = (int(w) for w in ints if w is not None)
    return left, 0 if causal else right


def check_chunk(attention_chunk: int | None) -> int:
    """Validate ``attention_chunk`` and return the chunk size, 0 when off (0 or None)."""
    if attention_chunk is None:
        return 0
    if not isinstance(attention_chunk, int) or attention_chunk < 0:
        raise ValueError(f"attention_chunk must be an int >= 0 (0 or None = off), got {attention_chunk!r}")
    return attention_chunk


def check_common(
    q: Tensor, k: Tensor, v: Tensor, softcap: float, sinks: Tensor | None, kv: str = "k and v"
) -> None:
    """Validate dtypes, head counts and head dims shared by both entry points."""
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor, got dtype {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{kv} must have q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"number of query heads ({hq}) must be a positive multiple of the number of "
            f"key/value heads ({hkv})"
        )
    if v.shape[-2] != hkv:
        raise ValueError(f"v has {v.shape[-2]} heads but k has {hkv}; they must match")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{kv.split()[0]} head dim ({k.shape[-1]}) must equal q head dim ({q.shape[-1]})")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap}")
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != hq):
        raise ValueError(
            f"sinks must have shape ({hq},) (one logit per query head), got {tuple(sinks.shape)}"
        )


def check_int32_shape(name: str, t: Tensor, length: int | None = None) -> None:
    """Check that ``t`` is a 1-D int32 tensor (of ``length`` if given), without reading it."""
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must have dtype torch.int32, got {t.dtype}")
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        want = f"({length},)" if length is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_int32_vector(name: str, t: Tensor, length: int | None = None) -> list[int]:
    """:func:`check_int32_shape`, then ``t``'s values (a device sync for a CUDA tensor)."""
    check_int32_shape(name, t, length)
    values: list[int] = t.tolist()
    return values


def check_cu(name: str, cu: Tensor) -> int:
    """Check a cumulative-length vector's dtype and shape; return the batch size it gives."""
    check_int32_shape(name, cu)
    if cu.shape[0] < 2:
        raise ValueError(f"{name} must have batch_size + 1 >= 2 entries, got {cu.shape[0]}")
    return cu.shape[0] - 1


def check_cu_seqlens(name: str, cu: Tensor, total: int) -> list[int]:
    """:func:`check_cu`, then its values against ``total`` rows; returns them."""
    check_cu(name, cu)
    values: list[int] = cu.tolist()
    if values[0] < 0 or any(b < a for a, b in itertools.pairwise(values)) or values[-1] > total:
        raise ValueError(
            f"{name} must be non-decreasing within [0, {total}] (the number of rows), got {values}"
        )
    return values


def check_varlen_layout(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Packed (total, heads, head_dim) q, k and v, with as many rows of k as of v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total, heads, head_dim), got {tuple(t.shape)}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"k and v must have the same number of rows, got {k.shape[0]} and {v.shape[0]}")


def check_cache_layout(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor | None) -> None:
    """q's rank (packed with ``cu_seqlens_q``), and 4-D caches alike but for the value head dim."""
    varlen_q = cu_seqlens_q is not None
    if q.dim() != (3 if varlen_q else 4):
        want = "(total_q, Hq, D) when cu_seqlens_q is given" if varlen_q else "(B, Sq, Hq, D)"
        raise ValueError(f"q must be {want}, got shape {tuple(q.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(
            f"v_cache shape {tuple(v_cache.shape)} must match k_cache shape "
            f"{tuple(k_cache.shape)} except for the head dim"
        )


def check_cache_args(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    page_table: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cache_seqlens: Tensor | int | None,
) -> tuple[int, int]:
    """Shape and dtype checks of a plain cache call (no extras left); returns (batch, Sk_new)."""
    check_cache_layout(q, k_cache, v_cache, cu_seqlens_q)
    batch = check_cu("cu_seqlens_q", cu_seqlens_q) if cu_seqlens_q is not None else q.shape[0]
    if page_table is not None:
        if page_table.dtype != torch.int32 or page_table.dim() != 2 or page_table.shape[0] != batch:
            raise ValueError(
                f"page_table must be an int32 tensor of shape ({batch}, max_blocks_per_seq), "
                f"got dtype {page_table.dtype} and shape {tuple(page_table.shape)}"
            )
    elif k_cache.shape[0] != batch:
        raise ValueError(f"k_cache batch size ({k_cache.shape[0]}) must equal the batch size of q ({batch})")
    if isinstance(cache_seqlens, Tensor):
        check_int32_shape("cache_seqlens", cache_seqlens, batch)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (both or neither)")
    if k is None or v is None:
        return batch, 0
    if k.dim() != 4 or k.shape[0] != batch or k.shape[2:] != k_cache.shape[2:]:
        raise ValueError(
            f"k must have shape ({batch}, Sk_new, {k_cache.shape[2]}, {k_cache.shape[3]}), "
            f"got {tuple(k.shape)}"
        )
    if v.shape != (*k.shape[:3], v_cache.shape[3]):
        raise ValueError(f"v must have shape {(*k.shape[:3], v_cache.shape[3])}, got {tuple(v.shape)}")
    return batch, k.shape[1]
