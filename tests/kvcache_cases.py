"""Random ``flash_attn_with_kvcache`` calls with FA3's kvcache extras, shaped as upstream's test.

Upstream's ``hopper/test_flash_attn.py::test_flash_attn_kvcache`` draws the same things:
a cache row per sequence picked by ``cache_batch_idx`` from a cache twice the batch,
``cache_leftpad`` in ``[0, cache_seqlens)``, new keys appended (packed by
``cu_seqlens_k_new`` when ``q`` is packed), rotary over a fraction of the head dim,
interleaved or not, and ``cache_seqlens`` leaving room for the new keys and, with rotary,
for the query rows' positions. Used by the reference's oracle test and the fast provider's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: Logical cache capacity of every sequence; a multiple of every page size used (1, 16, 64).
CAPACITY = 64
BATCH = 3


def _i32(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _cu(lens: list[int]) -> Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return _i32(out)


def random_case(
    seed: int, page: int | None, dtype: torch.dtype = torch.float64, **force: Any
) -> dict[str, Any]:
    """Keyword arguments of one call; ``force`` fixes a choice (see the names below)."""
    gen = torch.Generator().manual_seed(seed)

    def pick(name: str, choices: list[Any]) -> Any:
        if name in force:
            return force[name]
        return choices[int(torch.randint(len(choices), (1,), generator=gen))]

    def randint(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    hq, d = 4, 32
    hkv = pick("hkv", [1, 2, 4])
    dv = pick("dv", [32, 16])
    batch_idx = pick("batch_idx", [False, True])
    leftpad = pick("leftpad", [False, True])
    varlen_q = pick("varlen_q", [False, True])
    new_kv = pick("new_kv", ["none", "plain", "packed"])
    rotary_dim = pick("rotary_dim", [0, 16, 32]) if new_kv != "none" else 0
    interleaved = pick("interleaved", [False, True])
    rotary_seqlens = pick("rotary_seqlens", [False, True])
    mask = pick("mask", ["none", "causal", "window", "chunk", "causal-chunk"])
    empty = pick("empty", [False, False, False, True])
    sq = pick("sq", [1, 3, 5])

    rows = 2 * BATCH if batch_idx else BATCH
    lens_q = [randint(0, sq) for _ in range(BATCH)] if varlen_q else [sq] * BATCH
    if new_kv == "packed":
        lens_new = [randint(0, 4) for _ in range(BATCH)]
    elif new_kv == "plain":
        lens_new = [randint(1, 4)] * BATCH
    else:
        lens_new = [0] * BATCH
    room = [CAPACITY - max(n, sq) for n in lens_new]
    seqlens = [0 if empty else randint(0, r) for r in room]
    call: dict[str, Any] = {"cache_seqlens": _i32(seqlens)}
    if page is None:
        call["k_cache"], call["v_cache"] = randn(rows, CAPACITY, hkv, d), randn(rows, CAPACITY, hkv, dv)
    else:
        per_row = CAPACITY // page
        blocks = rows * per_row + 3
        call["k_cache"], call["v_cache"] = randn(blocks, page, hkv, d), randn(blocks, page, hkv, dv)
        perm = torch.randperm(blocks, generator=gen)[: rows * per_row]
        call["page_table"] = perm.view(rows, per_row).to(torch.int32)
    if batch_idx:
        call["cache_batch_idx"] = torch.randperm(rows, generator=gen)[:BATCH].to(torch.int32)
    if leftpad:
        call["cache_leftpad"] = _i32([randint(0, s) for s in seqlens])
    if varlen_q:
        call["q"] = randn(sum(lens_q), hq, d)
        call["cu_seqlens_q"] = _cu(lens_q)
        call["max_seqlen_q"] = max(lens_q)
    else:
        call["q"] = randn(BATCH, sq, hq, d)
    if new_kv == "packed":
        extra = pick("extra_rows", [0, 2])  # rows past cu_seqlens_k_new[-1]: never read
        call["k"] = randn(sum(lens_new) + extra, hkv, d)
        call["v"] = randn(sum(lens_new) + extra, hkv, dv)
        call["cu_seqlens_k_new"] = _cu(lens_new)
    elif new_kv == "plain":
        call["k"], call["v"] = randn(BATCH, lens_new[0], hkv, d), randn(BATCH, lens_new[0], hkv, dv)
    if rotary_dim:
        seqlen_ro = CAPACITY + 8
        angle = torch.rand(seqlen_ro, rotary_dim // 2, generator=gen, dtype=torch.float64) * 2 * torch.pi
        call["rotary_cos"], call["rotary_sin"] = angle.cos().to(dtype), angle.sin().to(dtype)
        call["rotary_interleaved"] = interleaved
        if rotary_seqlens:
            call["rotary_seqlens"] = _i32([randint(0, CAPACITY) for _ in range(BATCH)])
    if mask in ("causal", "causal-chunk"):
        call["causal"] = True
    if mask == "window":
        call["window_size"] = (randint(0, 20), randint(0, 6))
    if mask in ("chunk", "causal-chunk"):
        call["attention_chunk"] = randint(2, 24)
    return call


def clone_call(call: dict[str, Any]) -> dict[str, Any]:
    """A copy whose caches are fresh (calls append into them in place)."""
    return {**call, "k_cache": call["k_cache"].clone(), "v_cache": call["v_cache"].clone()}
