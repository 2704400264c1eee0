"""The reference's kvcache extras against an independent float64 oracle written from upstream.

The oracle below uses none of the project's code. It follows, sequence by sequence and
position by position, what Dao-AILab/flash-attention states:

* ``hopper/flash_attn_interface.py`` (``flash_attn_with_kvcache`` docstring): new keys go
  into the cache at ``cache_seqlens``; k is rotated at ``cache_seqlens + j``; q at
  ``cache_seqlens + i`` when causal or local, else every row at ``cache_seqlens``;
  ``cache_batch_idx`` indexes the cache; ``cache_leftpad`` is where the cache starts.
* ``hopper/seqlen.h``: ``rotary_seqlens`` replaces that start when given; the keys are
  ``[leftpad, cache_seqlens + new)``; ``hopper/flash_api.cpp``: a window side covering
  every key or query is no window (so no "local" for rotary), a chunk makes it local.
* ``hopper/test_util.py`` ``attention_ref`` / ``construct_local_mask`` /
  ``construct_chunk_mask``: masks over the keys shifted by the leftpad, bottom-right.
* ``flash_attn/layers/rotary.py`` ``apply_rotary_emb_torch``: ``x * cos + rotate_half(x) *
  sin`` over the first ``rotary_dim`` features, interleaved or GPT-NeoX halves.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from kvcache_cases import clone_call, random_case
from torch import Tensor

from kernel_fallback.integrations.flash_attn._reference import flash_attn_with_kvcache


def _rotate_half(x: Tensor, interleaved: bool) -> Tensor:
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).reshape(x.shape)


def _rope(x: Tensor, positions: list[int], cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """x (L, H, D) with row l at ``positions[l]``: upstream's apply_rotary_emb_torch."""
    if x.shape[0] == 0:
        return x
    ro = 2 * cos.shape[-1]
    c, s = cos[positions].to(x.dtype), sin[positions].to(x.dtype)
    if interleaved:
        c, s = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)
    else:
        c, s = torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)
    c, s = c.unsqueeze(1), s.unsqueeze(1)
    head = x[..., :ro]
    return torch.cat((head * c + _rotate_half(head, interleaved) * s, x[..., ro:]), dim=-1)


def _allowed(i: int, j: int, lq: int, lk: int, left: int, right: int, chunk: int) -> bool:
    """Upstream's local and chunk masks, bottom-right aligned (-1: that side unbounded)."""
    diag = i + lk - lq
    if right >= 0 and j > diag + right:
        return False
    if left >= 0 and j < diag - left:
        return False
    if chunk > 0:
        start = diag - diag % chunk
        if not start <= j < start + chunk:
            return False
    return True


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, left: int, right: int, chunk: int) -> Tensor:
    """q (Lq, Hq, D), k (Lk, Hkv, D), v (Lk, Hkv, Dv): softmax attention, empty rows zero."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    out = torch.zeros(lq, hq, v.shape[-1], dtype=torch.float64)
    for h in range(hq):
        kh = h // (hq // hkv)
        for i in range(lq):
            keys = [j for j in range(lk) if _allowed(i, j, lq, lk, left, right, chunk)]
            if not keys:
                continue
            scores = torch.stack([(q[i, h] * k[j, kh]).sum() * scale for j in keys])
            weights = torch.softmax(scores, dim=0)
            out[i, h] = sum(
                (w * v[j, kh] for w, j in zip(weights, keys, strict=True)), torch.zeros(v.shape[-1])
            )
    return out


def _attend_plain(q: Tensor, k: Tensor, v: Tensor, scale: float, left: int, right: int, chunk: int) -> Tensor:
    """Upstream's ``attention_ref(upcast=False, reorder_ops=True)``: every op in q's dtype."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    keep = torch.tensor([[_allowed(i, j, lq, lk, left, right, chunk) for j in range(lk)] for i in range(lq)])
    keep = keep.view(lq, lk)
    k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k * scale).masked_fill(~keep, -math.inf)
    weights = torch.softmax(scores, dim=-1).masked_fill(~keep.any(-1, keepdim=True), 0.0)
    return torch.einsum("hqk,khd->qhd", weights, v)


def oracle(call: dict[str, Any], dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Output and the caches after the call, from upstream's stated semantics.

    float64: exact loops. Another ``dtype``: upstream's plain same-dtype computation
    (rotary in float32 rounded to ``dtype``, as ``apply_rotary_emb``; attention as
    :func:`_attend_plain`), the baseline of upstream's error rule.
    """
    k_cache, v_cache = call["k_cache"].to(dtype).clone(), call["v_cache"].to(dtype).clone()
    page_table = call.get("page_table")
    cu_q = call.get("cu_seqlens_q")
    q = call["q"].to(dtype)
    exact = dtype == torch.float64

    def rope(x: Tensor, positions: list[int]) -> Tensor:
        assert cos is not None
        if exact:
            return _rope(x, positions, cos, sin, interleaved)
        return _rope(x.float(), positions, cos, sin, interleaved).to(dtype)

    batch = cu_q.shape[0] - 1 if cu_q is not None else q.shape[0]
    page = k_cache.shape[1]
    capacity = page_table.shape[1] * page if page_table is not None else page
    causal = call.get("causal", False)
    left, right = (int(w) for w in call.get("window_size", (-1, -1)))
    if causal:
        right = 0
    chunk = call.get("attention_chunk", 0) or 0
    cos: Tensor | None = call.get("rotary_cos")
    sin: Tensor = call["rotary_sin"] if cos is not None else torch.zeros(0)
    interleaved = call.get("rotary_interleaved", True)
    k_new: Tensor | None = call.get("k")
    v_new: Tensor = call["v"] if k_new is not None else torch.zeros(0)
    cu_new: Tensor | None = call.get("cu_seqlens_k_new")

    def slot(row: int, position: int) -> tuple[int, int]:
        if page_table is None:
            return row, position
        return int(page_table[row, position // page]), position % page

    outs = []
    for b in range(batch):
        row = int(call["cache_batch_idx"][b]) if call.get("cache_batch_idx") is not None else b
        cached = int(call["cache_seqlens"][b])
        qb = q[int(cu_q[b]) : int(cu_q[b + 1])] if cu_q is not None else q[b]
        if k_new is None:
            kb = vb = torch.zeros(0, 1, 1, dtype=dtype)
        elif cu_new is not None:
            kb, vb = (
                k_new[int(cu_new[b]) : int(cu_new[b + 1])].to(dtype),
                v_new[int(cu_new[b]) : int(cu_new[b + 1])].to(dtype),
            )
        else:
            kb, vb = k_new[b].to(dtype), v_new[b].to(dtype)
        if cos is not None:
            start = int(call["rotary_seqlens"][b]) if call.get("rotary_seqlens") is not None else cached
            kb = rope(kb, [start + j for j in range(kb.shape[0])])
            # FA3 (flash_api.cpp) first drops window sides that cover everything.
            seqlen_q = call["max_seqlen_q"] if cu_q is not None else q.shape[1]
            l_eff = -1 if left >= capacity - 1 else left
            r_eff = -1 if right >= seqlen_q - 1 else right
            moves = causal or l_eff >= 0 or r_eff >= 0 or chunk > 0
            qb = rope(qb, [start + (i if moves else 0) for i in range(qb.shape[0])])
        for j in range(kb.shape[0]):
            k_cache[slot(row, cached + j)] = kb[j]
            v_cache[slot(row, cached + j)] = vb[j]
        end = cached + kb.shape[0]
        pad = int(call["cache_leftpad"][b]) if call.get("cache_leftpad") is not None else 0
        keys = torch.stack([k_cache[slot(row, p)] for p in range(pad, end)]) if end > pad else k_cache[:0, 0]
        vals = torch.stack([v_cache[slot(row, p)] for p in range(pad, end)]) if end > pad else v_cache[:0, 0]
        scale = call.get("softmax_scale") or 1 / math.sqrt(q.shape[-1])
        attend = _attend if exact else _attend_plain
        outs.append(attend(qb, keys, vals, scale, left, right, chunk))
    out = torch.cat(outs) if cu_q is not None else torch.stack(outs)
    return out, k_cache, v_cache


def test_oracle_rotary_turns_pairs_by_the_angle() -> None:
    """The oracle's own rotary: feature pair (0, 1) interleaved, (0, rd/2) otherwise."""
    angle = torch.tensor([[0.3, 1.1]], dtype=torch.float64)
    x = torch.zeros(1, 1, 6, dtype=torch.float64)
    x[0, 0, 0] = 1.0
    inter = _rope(x, [0], angle.cos(), angle.sin(), interleaved=True)[0, 0]
    neox = _rope(x, [0], angle.cos(), angle.sin(), interleaved=False)[0, 0]
    c, s = math.cos(0.3), math.sin(0.3)
    torch.testing.assert_close(inter, torch.tensor([c, s, 0, 0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(neox, torch.tensor([c, 0, s, 0, 0, 0], dtype=torch.float64))


def _check(call: dict[str, Any]) -> None:
    want, want_k, want_v = oracle(call)
    mine = clone_call(call)
    got = flash_attn_with_kvcache(**mine)
    assert isinstance(got, Tensor)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(mine["k_cache"], want_k, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine["v_cache"], want_v, rtol=0, atol=0)


@pytest.mark.parametrize("page", [None, 1, 16, 64], ids=["contiguous", "page1", "page16", "page64"])
@pytest.mark.parametrize("seed", range(5), ids=[f"seed{s}" for s in range(5)])
def test_reference_matches_oracle_on_random_calls(page: int | None, seed: int) -> None:
    _check(random_case(100 + seed, page))


FEATURES = [
    pytest.param({"batch_idx": True, "leftpad": False, "new_kv": "none"}, id="batch-idx-only"),
    pytest.param(
        {"batch_idx": False, "leftpad": True, "new_kv": "none", "mask": "causal"}, id="leftpad-causal"
    ),
    pytest.param(
        {"leftpad": True, "new_kv": "plain", "rotary_dim": 0, "mask": "chunk"}, id="leftpad-chunk-append"
    ),
    pytest.param({"new_kv": "packed", "rotary_dim": 0, "varlen_q": False}, id="packed-append-dense-q"),
    pytest.param(
        {"new_kv": "packed", "varlen_q": True, "extra_rows": 2, "rotary_dim": 0}, id="packed-extra-rows"
    ),
    pytest.param(
        {"new_kv": "plain", "rotary_dim": 32, "interleaved": True, "mask": "causal", "rotary_seqlens": False},
        id="rotary-interleaved-causal",
    ),
    pytest.param(
        {"new_kv": "plain", "rotary_dim": 16, "interleaved": False, "mask": "none", "sq": 3},
        id="rotary-half-neox-fixed-q",
    ),
    pytest.param(
        {"new_kv": "packed", "rotary_dim": 32, "rotary_seqlens": True, "mask": "window", "varlen_q": True},
        id="rotary-seqlens-window-packed",
    ),
    pytest.param(
        {"new_kv": "packed", "empty": True, "rotary_dim": 16, "leftpad": True, "batch_idx": True},
        id="empty-caches",
    ),
    pytest.param({"new_kv": "none", "empty": True, "leftpad": True}, id="empty-no-keys"),
]


@pytest.mark.parametrize("page", [None, 16], ids=["contiguous", "page16"])
@pytest.mark.parametrize("force", FEATURES)
def test_reference_matches_oracle_per_feature(force: dict[str, Any], page: int | None) -> None:
    _check(random_case(7, page, **force))


def test_rotary_window_covering_everything_is_not_local() -> None:
    """FA3 normalizes (capacity - 1, Sq - 1) to no window: q rows all sit at the start."""
    call = random_case(3, None, new_kv="plain", rotary_dim=32, mask="none", sq=3, varlen_q=False)
    call["window_size"] = (100, 2)
    want, _, _ = oracle(call)
    got = flash_attn_with_kvcache(**clone_call(call))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    call["window_size"] = (100, 1)  # right side 1 < Sq - 1: local, rows move
    moved, _, _ = oracle(call)
    assert not torch.allclose(moved, want)
    torch.testing.assert_close(flash_attn_with_kvcache(**clone_call(call)), moved, rtol=1e-9, atol=1e-10)
