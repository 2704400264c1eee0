"""The reference in ``_torch_attention`` against upstream FlashAttention's test semantics.

``_upstream_ref`` is an independent float64 reimplementation of the semantics of
``attention_ref`` in FlashAttention's ``hopper/test_util.py`` (padded batches with
query/key padding masks, ``construct_local_mask``, ``construct_chunk_mask``, learnable
sinks, softcap before masking, fully masked rows output zero), written from the
semantics, not copied. The cases follow the parametrization of
``hopper/test_flash_attn.py``'s varlen test: its sequence-length pairs, random windows
passed as 0-d tensors, causal or local, softcap 0 or 15, ``attention_chunk`` 0, 1 or a
power of two, MHA/GQA, random per-sequence lengths from padding masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from kernel_fallback.integrations.flash_attn._reference import (
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)

# Upstream's hopper/test_flash_attn.py varlen (seqlen_q, seqlen_k) pairs, up to 1024 for CPU time.
SEQLENS = [(1, 1), (1, 3), (2, 1), (511, 1), (3, 513), (64, 128), (79, 83), (113, 203), (307, 256)]
SEQLENS += [(640, 128), (1023, 1024)]


@dataclass(frozen=True)
class Mode:
    causal: bool = False
    local: bool = False
    softcap: float = 0.0
    chunk: int = 0
    sinks: bool = False
    hkv: int = 2


MODES = [
    pytest.param(Mode(), id="full"),
    pytest.param(Mode(causal=True, hkv=1), id="causal-gqa"),
    pytest.param(Mode(local=True, softcap=15.0), id="local-softcap"),
    pytest.param(Mode(causal=True, local=True, sinks=True), id="causal-local-sinks"),
    pytest.param(Mode(chunk=1), id="chunk1"),
    pytest.param(Mode(chunk=16, causal=True, hkv=1), id="chunk16-causal-gqa"),
    pytest.param(Mode(chunk=64, softcap=15.0, sinks=True), id="chunk64-softcap-sinks"),
    pytest.param(Mode(chunk=16, local=True), id="chunk16-local"),
]


def _upstream_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_mask: Tensor,
    k_mask: Tensor,
    *,
    causal: bool,
    window: tuple[int | None, int | None],
    chunk: int,
    softcap: float,
    sinks: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Padded float64 attention with upstream's masks; q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    row = torch.arange(q.shape[1]).view(1, 1, -1, 1)
    col = torch.arange(k.shape[1]).view(1, 1, 1, -1)
    sk = k_mask.sum(-1).view(-1, 1, 1, 1)
    sq = q_mask.sum(-1).view(-1, 1, 1, 1)
    diag = row + sk - sq  # bottom-right alignment per sequence
    left, right = window
    if causal:
        right = 0
    masked = (~k_mask.view(k_mask.shape[0], 1, 1, -1)).expand(-1, 1, q.shape[1], -1).clone()
    # construct_local_mask
    if left is None and right is not None:
        masked |= col > diag + right
    elif left is not None:
        masked |= col > (torch.minimum(diag + right, sk) if right is not None else sk)
        masked |= col < diag - left
    if chunk > 0:  # construct_chunk_mask: both sides of the query's own chunk
        start = torch.div(diag, chunk, rounding_mode="floor") * chunk
        masked |= (col < start) | (col >= start + chunk)
    scores = scores.masked_fill(masked, float("-inf"))
    if sinks is not None:
        sink = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = probs.masked_fill(masked.all(-1, keepdim=True), 0.0).nan_to_num(0.0)
    out = torch.einsum("bhts,bshd->bthd", probs, v) * q_mask.view(*q_mask.shape, 1, 1)
    return out, lse


def _padding_mask(gen: torch.Generator, max_len: int, batch: int) -> Tensor:
    """Upstream's 'random' padding mask: each length in [max(1, max_len - 20), max_len]."""
    lens = torch.randint(max(1, max_len - 20), max_len + 1, (batch, 1), generator=gen)
    return torch.arange(max_len).view(1, -1) < lens


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("seqlen_q", "seqlen_k"), SEQLENS, ids=[f"{a}x{b}" for a, b in SEQLENS])
def test_varlen_reference_matches_upstream_semantics(seqlen_q: int, seqlen_k: int, mode: Mode) -> None:
    gen = torch.Generator().manual_seed(seqlen_q * 7919 + seqlen_k)
    batch, hq, d = 3, 2, 16
    q = torch.randn(batch, seqlen_q, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, seqlen_k, mode.hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, seqlen_k, mode.hkv, d, generator=gen, dtype=torch.float64)
    sinks = torch.randn(hq, generator=gen, dtype=torch.float64) if mode.sinks else None
    q_mask, k_mask = _padding_mask(gen, seqlen_q, batch), _padding_mask(gen, seqlen_k, batch)
    window: tuple[int | None, int | None] = (None, None)
    window_arg: tuple[Tensor, Tensor] | tuple[int, int] = (-1, -1)
    if mode.local:  # upstream draws the window as a tensor and passes its 0-d elements
        drawn = torch.randint(0, seqlen_k, (2,), generator=gen)
        window = (int(drawn[0]), int(drawn[1]))
        window_arg = (drawn[0], drawn[1])
    ref_out, ref_lse = _upstream_ref(
        q,
        k,
        v,
        q_mask,
        k_mask,
        causal=mode.causal,
        window=window,
        chunk=mode.chunk,
        softcap=mode.softcap,
        sinks=sinks,
    )
    lens_q, lens_k = q_mask.sum(-1), k_mask.sum(-1)
    cu_q = torch.cat([torch.zeros(1), lens_q.cumsum(0)]).to(torch.int32)
    cu_k = torch.cat([torch.zeros(1), lens_k.cumsum(0)]).to(torch.int32)
    out, lse = flash_attn_varlen_func(
        q[q_mask],
        k[k_mask],
        v[k_mask],
        cu_q,
        cu_k,
        causal=mode.causal,
        window_size=window_arg,
        attention_chunk=mode.chunk,
        softcap=mode.softcap,
        sinks=sinks,
        return_softmax_lse=True,
    )
    torch.testing.assert_close(out, ref_out[q_mask], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse.permute(0, 2, 1)[q_mask].T.float(), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize(
    "window_size",
    [
        pytest.param(torch.tensor([3, 1]), id="tensor"),
        pytest.param((torch.tensor(3), torch.tensor(1)), id="pair-of-0d"),
        pytest.param((3, 1), id="ints"),
    ],
)
def test_window_size_tensor_forms_agree(window_size: object) -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 9, 2, 8, generator=gen)
    cache = torch.randn(1, 12, 2, 8, generator=gen), torch.randn(1, 12, 2, 8, generator=gen)
    out = flash_attn_with_kvcache(q, *cache, window_size=window_size)  # type: ignore[arg-type]
    ints = flash_attn_with_kvcache(q, *cache, window_size=(3, 1))
    full = flash_attn_with_kvcache(q, *cache)
    assert isinstance(out, Tensor)
    assert isinstance(ints, Tensor)
    assert isinstance(full, Tensor)
    assert torch.equal(out, ints)
    assert not torch.allclose(out, full)


@pytest.mark.parametrize(
    "window_size",
    [
        pytest.param(torch.tensor([3.0, 1.0]), id="float-tensor"),
        pytest.param(torch.tensor([3, 1, 2]), id="three-elements"),
        pytest.param((torch.tensor([3, 1]), torch.tensor(1)), id="non-scalar-side"),
        pytest.param((True, 1), id="bool-side"),
        pytest.param((torch.tensor(-2), torch.tensor(0)), id="below-minus-one"),
    ],
)
def test_window_size_bad_forms_are_refused(window_size: object) -> None:
    q = torch.ones(1, 2, 2, 8)
    with pytest.raises(ValueError, match=r"window_size must be a pair of ints >= -1 .*got"):
        flash_attn_with_kvcache(q, torch.ones(1, 4, 2, 8), torch.ones(1, 4, 2, 8), window_size=window_size)  # type: ignore[arg-type]
