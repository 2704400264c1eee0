"""The reference (``_reference``) against upstream FlashAttention's test semantics.

``_upstream_ref`` is an independent float64 reimplementation of the semantics of
``attention_ref`` in FlashAttention's ``hopper/test_util.py`` (padded batches with
query/key padding masks, ``construct_local_mask``, ``construct_chunk_mask``, learnable
sinks, softcap before masking, fully masked rows output zero), written from the
semantics, not copied. The cases follow the parametrization of
``hopper/test_flash_attn.py``'s varlen test: its sequence-length pairs, random windows
passed as 0-d tensors, causal or local, softcap 0 or 15, ``attention_chunk`` 0, 1 or a
power of two, MHA/GQA, random per-sequence lengths from padding masks.

The chains (torch provider, CPU) against the same oracle: upstream's backward cases
(gradients of q, k, v and sinks; bf16 within upstream's rule, float64 exact) for varlen
and kvcache without appends, and a float64 sweep over every path and degenerate shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from kernel_fallback.integrations.flash_attn import _fast as fast
from kernel_fallback.integrations.flash_attn import flash_attn_varlen_func as chain_varlen
from kernel_fallback.integrations.flash_attn import flash_attn_with_kvcache as chain_kvcache
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
    unused: bool = False  # upstream's add_unused_qkv: seqused_q/k shorter than the spans


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
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Padded attention with upstream's masks; q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D).

    float64 is the oracle; another ``dtype`` is upstream's plain PyTorch computation in it.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
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
        sink = sinks.to(dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = probs.masked_fill(masked.all(-1, keepdim=True), 0.0).nan_to_num(0.0)
    out = torch.einsum("bhts,bshd->bthd", probs, v) * q_mask.view(*q_mask.shape, 1, 1)
    return out, lse


def _padding_mask(gen: torch.Generator, max_len: int, batch: int, zero_lengths: bool = False) -> Tensor:
    """Upstream's 'random' padding mask: each length in [max(1, max_len - 20), max_len].

    ``zero_lengths`` (upstream's, for keys): the floor is 0, and every fifth sequence and
    the last have length 0.
    """
    lens = torch.randint(max(0 if zero_lengths else 1, max_len - 20), max_len + 1, (batch, 1), generator=gen)
    if zero_lengths:
        lens[::5] = 0
        lens[-1] = 0
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


# Upstream's backward cases (test_flash_attn_varlen_output): no attention_chunk (FA3 has no
# backward for it), key padding with zero-length sequences, add_unused_qkv as seqused_q/k.
BACKWARD_MODES = [
    pytest.param(Mode(), id="full"),
    pytest.param(Mode(causal=True, hkv=1), id="causal-mqa"),
    pytest.param(Mode(local=True, softcap=15.0), id="local-softcap"),
    pytest.param(Mode(causal=True, local=True, sinks=True, unused=True), id="causal-local-sinks-unused"),
]


def _unused(gen: torch.Generator, span: Tensor, active: bool) -> tuple[Tensor, Tensor | None]:
    """Upstream's add_unused_qkv: the attended prefix of each span, and seqused (int32)."""
    if not active:
        return span, None
    attended = span & _padding_mask(gen, span.shape[1], span.shape[0])
    return attended, attended.sum(-1).to(torch.int32)


def _cu_of(mask: Tensor) -> Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(-1).cumsum(0)]).to(torch.int32)


def _within_upstream_rule(got: Tensor, plain: Tensor, oracle: Tensor, softcap: float) -> None:
    """Upstream's rule: error vs the oracle at most 2x (3x with softcap) a plain computation's.

    As upstream, everything is compared in the tested dtype (``got``'s): the float64 oracle
    rounded to it, and ``atol`` the rounding of one addition in it.
    """
    oracle, plain, got = oracle.detach().to(got.dtype), plain.detach().to(got.dtype), got.detach()
    factor = 2 if softcap == 0 else 3
    atol = 2 * (oracle + 0.3 - 0.3 - oracle).abs().max() + (0 if softcap == 0 else 3e-4)
    err, plain_err = (got - oracle).abs().max(), (plain - oracle).abs().max()
    assert err <= factor * plain_err + atol, f"error {float(err):.3g} vs plain {float(plain_err):.3g}"


# Upstream's pairs up to 640 x 128: autograd through both sides of 1023 x 1024 costs ~40 s of CPU.
BACKWARD_SEQLENS = [pair for pair in SEQLENS if max(pair) <= 640]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bfloat16", "float64"])
@pytest.mark.parametrize("mode", BACKWARD_MODES)
@pytest.mark.parametrize(
    ("seqlen_q", "seqlen_k"), BACKWARD_SEQLENS, ids=[f"{a}x{b}" for a, b in BACKWARD_SEQLENS]
)
def test_chain_gradients_match_upstream_oracle(
    seqlen_q: int, seqlen_k: int, mode: Mode, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(seqlen_q * 31 + seqlen_k)
    batch, hq, d = 4, 2, 16
    q = torch.randn(batch, seqlen_q, hq, d, generator=gen, dtype=torch.float64)
    if mode.softcap:
        q = q * mode.softcap / 4  # upstream: scores within the cap's range
    k = torch.randn(batch, seqlen_k, mode.hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, seqlen_k, mode.hkv, d, generator=gen, dtype=torch.float64)
    sinks = torch.randn(hq, generator=gen, dtype=torch.float64) if mode.sinks else None
    # The chain's inputs in ``dtype``; the oracle's are the same values in float64.
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    sinks = sinks.to(dtype).double() if sinks is not None else None
    q_span, k_span = (
        _padding_mask(gen, seqlen_q, batch),
        _padding_mask(gen, seqlen_k, batch, zero_lengths=True),
    )
    q_mask, seqused_q = _unused(gen, q_span, mode.unused)
    k_mask, seqused_k = _unused(gen, k_span, mode.unused)
    window: tuple[int | None, int | None] = (None, None)
    window_arg: tuple[Tensor, Tensor] | tuple[int, int] = (-1, -1)
    if mode.local:
        drawn = torch.randint(0, seqlen_k, (2,), generator=gen)
        window, window_arg = (int(drawn[0]), int(drawn[1])), (drawn[0], drawn[1])
    grad_out = torch.randn(batch, seqlen_q, hq, d, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + (
        [sinks.clone().requires_grad_()] if sinks is not None else []
    )
    masks: dict[str, Any] = {"causal": mode.causal, "window": window, "chunk": 0, "softcap": mode.softcap}
    oracle, _ = _upstream_ref(
        leaves[0],
        leaves[1],
        leaves[2],
        q_mask,
        k_mask,
        sinks=leaves[3] if sinks is not None else None,
        **masks,
    )
    oracle_grads = torch.autograd.grad(oracle, leaves, grad_out)

    packed = [q[q_span], k[k_span], v[k_span]]
    inputs = [t.to(dtype).requires_grad_() for t in packed] + (
        [sinks.to(dtype).requires_grad_()] if sinks is not None else []
    )
    out = chain_varlen(
        *inputs[:3],
        _cu_of(q_span),
        _cu_of(k_span),
        seqlen_q,
        seqlen_k,
        seqused_q=seqused_q,
        seqused_k=seqused_k,
        causal=mode.causal,
        window_size=window_arg,
        softcap=mode.softcap,
        sinks=inputs[3] if sinks is not None else None,
    )
    want = fast.REFERENCE_FLOAT64 if dtype == torch.float64 else fast.REFERENCE_AUTOGRAD
    assert fast.last_backend("flash_attn_varlen_func") == want
    grads = torch.autograd.grad(out, inputs, grad_out[q_span].to(dtype))
    # Back to the padded layout; rows outside the spans (and unused rows) have no gradient.
    padded = []
    for grad, span in zip(grads[:3], (q_span, k_span, k_span), strict=True):
        full = torch.zeros(*span.shape, *grad.shape[1:], dtype=torch.float64)
        full[span] = grad.double()
        padded.append(full)
    padded += [g.double() for g in grads[3:]]
    if dtype == torch.float64:  # exact: float64 arithmetic throughout
        torch.testing.assert_close(out[q_mask[q_span]], oracle[q_mask], rtol=1e-12, atol=1e-12)
        for got, ref_grad in zip(padded, oracle_grads, strict=True):
            torch.testing.assert_close(got, ref_grad, rtol=1e-10, atol=1e-10)
        return
    # Upstream's plain PyTorch computation in the tested dtype (its upcast=False reference).
    plain_leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    plain, _ = _upstream_ref(
        plain_leaves[0],
        plain_leaves[1],
        plain_leaves[2],
        q_mask,
        k_mask,
        sinks=plain_leaves[3] if sinks is not None else None,
        dtype=dtype,
        **masks,
    )
    plain_grads = torch.autograd.grad(plain, plain_leaves, grad_out.to(dtype))
    _within_upstream_rule(out, plain[q_span], oracle[q_span], mode.softcap)
    for got, plain_grad, ref_grad in zip(padded, plain_grads, oracle_grads, strict=True):
        _within_upstream_rule(got.to(dtype), plain_grad, ref_grad, mode.softcap)


@dataclass(frozen=True)
class Case:
    """One float64 call: ``entry`` varlen, decode (B, Sq) over a cache, or packed (cu_seqlens_q)."""

    entry: str
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    hq: int = 4
    hkv: int = 2
    d: int = 16
    dv: int = 16
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    chunk: int = 0
    softcap: float = 0.0
    sinks: bool = False
    page: int = 0  # page size of a paged cache; 0: contiguous
    appends: int = 0  # new keys appended to the cache (the last ``appends`` of each sequence)


FLOAT64_CASES = [
    pytest.param(Case("varlen", (5, 9, 3), (7, 9, 12)), id="varlen"),
    pytest.param(
        Case("varlen", (5, 9, 3), (7, 9, 12), hkv=1, causal=True, sinks=True), id="varlen-causal-mqa-sinks"
    ),
    pytest.param(Case("varlen", (20, 9), (31, 9), window=(5, 3), softcap=4.0), id="varlen-window-softcap"),
    pytest.param(Case("varlen", (20, 9), (31, 9), chunk=8, causal=True, sinks=True), id="varlen-chunk-sinks"),
    pytest.param(Case("varlen", (6, 3), (9, 5), d=64, dv=256, causal=True), id="varlen-d64-dv256"),
    pytest.param(Case("varlen", (0, 4, 3, 2), (5, 0, 3, 0), sinks=True), id="varlen-empty-sequences"),
    pytest.param(Case("varlen", (3, 2), (0, 0), sinks=True), id="varlen-no-keys-at-all"),
    pytest.param(Case("varlen", (0, 0), (3, 2)), id="varlen-no-queries-at-all"),
    pytest.param(Case("varlen", (3, 1), (1, 1), causal=True), id="varlen-single-key"),
    pytest.param(Case("varlen", (9, 6), (4, 2), causal=True, sinks=True), id="varlen-q-longer-than-k"),
    pytest.param(Case("varlen", (2, 1, 2), (1, 1, 1), causal=True), id="varlen-2x1-causal"),
    pytest.param(Case("varlen", (2, 2, 1), (0, 1, 0), causal=True), id="varlen-2x1-causal-zero-keys"),
    pytest.param(Case("decode", (1, 1, 1), (0, 5, 17), causal=True), id="decode"),
    pytest.param(
        Case("decode", (1, 1), (3, 17), hkv=1, softcap=5.0, sinks=True), id="decode-mqa-softcap-sinks"
    ),
    pytest.param(Case("decode", (3, 3), (1, 17), causal=True), id="decode-q-longer-than-k"),
    pytest.param(Case("decode", (2, 2), (0, 0), sinks=True), id="decode-empty-cache"),
    pytest.param(Case("decode", (2, 2), (6, 13), appends=2, causal=True), id="decode-appends"),
    pytest.param(Case("decode", (2, 2, 2), (0, 7, 16), page=4, causal=True, window=(3, -1)), id="paged"),
    pytest.param(Case("decode", (1, 1), (5, 16), page=4, d=64, dv=256, sinks=True), id="paged-d64-dv256"),
    pytest.param(Case("decode", (2, 2), (5, 16), page=1, appends=1, causal=True), id="paged-page1-appends"),
    pytest.param(Case("packed", (1, 0, 3), (4, 9, 11), page=4, causal=True, sinks=True), id="packed-paged"),
    pytest.param(Case("packed", (2, 3), (1, 0), causal=True), id="packed-single-and-no-key"),
]


def _paged(logical: Tensor, table: Tensor) -> Tensor:
    """A physical cache (two spare pages) holding ``logical`` (B, cap, H, D) at ``table``'s pages."""
    batch, per_seq = table.shape
    page = logical.shape[1] // per_seq
    physical = torch.full((batch * per_seq + 2, page, *logical.shape[2:]), float("nan"), dtype=logical.dtype)
    physical[table.reshape(-1).long()] = logical.reshape(batch * per_seq, page, *logical.shape[2:])
    return physical


@pytest.mark.parametrize("case", FLOAT64_CASES)
def test_float64_through_the_chain_is_exact(case: Case) -> None:
    gen = torch.Generator().manual_seed(len(case.lens_q) * 131 + sum(case.lens_k))
    batch = len(case.lens_q)
    max_q = max(case.lens_q)
    cap = max(case.lens_k)
    if case.page:  # whole pages, at least one
        cap = -(-max(cap, 1) // case.page) * case.page
    q = torch.randn(batch, max_q, case.hq, case.d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, cap, case.hkv, case.d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, cap, case.hkv, case.dv, generator=gen, dtype=torch.float64)
    sinks = torch.randn(case.hq, generator=gen, dtype=torch.float64) if case.sinks else None
    q_mask = torch.arange(max_q).view(1, -1) < torch.tensor(case.lens_q).view(-1, 1)
    k_mask = torch.arange(cap).view(1, -1) < torch.tensor(case.lens_k).view(-1, 1)
    left, right = case.window
    oracle, oracle_lse = _upstream_ref(
        q,
        k,
        v,
        q_mask,
        k_mask,
        causal=case.causal,
        window=(None if left < 0 else left, None if right < 0 else right),
        chunk=case.chunk,
        softcap=case.softcap,
        sinks=sinks,
    )
    opts: dict[str, Any] = {
        "causal": case.causal,
        "window_size": case.window,
        "attention_chunk": case.chunk,
        "softcap": case.softcap,
        "sinks": sinks,
        "return_softmax_lse": True,
    }
    if case.entry == "varlen":
        out, lse = chain_varlen(q[q_mask], k[k_mask], v[k_mask], _cu_of(q_mask), _cu_of(k_mask), **opts)
        entry = "flash_attn_varlen_func"
    else:
        lens = torch.tensor(case.lens_k, dtype=torch.int32)
        k_cache, v_cache = k.clone(), v.clone()
        if case.appends:  # the new keys are not in the cache yet: garbage where they go
            rows = torch.arange(cap).view(1, -1)
            fresh = (rows >= (lens - case.appends).view(-1, 1)) & k_mask
            k_cache[fresh], v_cache[fresh] = (
                torch.randn_like(k_cache[fresh]),
                torch.randn_like(v_cache[fresh]),
            )
            new = torch.arange(case.appends).view(1, -1) + (lens - case.appends).view(-1, 1)
            opts |= {"k": k.gather(1, new.view(batch, -1, 1, 1).expand(-1, -1, case.hkv, case.d))}
            opts |= {"v": v.gather(1, new.view(batch, -1, 1, 1).expand(-1, -1, case.hkv, case.dv))}
            lens = lens - case.appends
        if case.page:
            per_seq = cap // case.page
            table = torch.randperm(batch * per_seq + 2, generator=gen)[: batch * per_seq].view(batch, per_seq)
            k_cache, v_cache = _paged(k_cache, table.int()), _paged(v_cache, table.int())
            opts["page_table"] = table.int()
        query = q if case.entry == "decode" else q[q_mask]
        if case.entry == "packed":
            opts["cu_seqlens_q"] = _cu_of(q_mask)
        out, lse = chain_kvcache(query, k_cache, v_cache, cache_seqlens=lens, **opts)
        entry = "flash_attn_with_kvcache"
    assert fast.last_backend(entry) == fast.REFERENCE_FLOAT64
    assert out.dtype == torch.float64
    if case.entry == "decode":
        torch.testing.assert_close(out, oracle, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, oracle_lse.float(), rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(out, oracle[q_mask], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, oracle_lse.permute(0, 2, 1)[q_mask].T.float(), rtol=1e-6, atol=1e-6)


KVCACHE_BACKWARD = [
    pytest.param(Case("decode", (1, 1, 1), (0, 5, 17), causal=True), id="decode"),
    pytest.param(
        Case("decode", (3, 3), (2, 40), hkv=1, softcap=5.0, sinks=True), id="decode-mqa-softcap-sinks"
    ),
    pytest.param(Case("decode", (2, 2, 2), (0, 7, 16), page=4, window=(3, -1), causal=True), id="paged"),
    pytest.param(Case("packed", (1, 0, 3), (4, 9, 11), page=4, causal=True), id="packed-paged"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bfloat16", "float64"])
@pytest.mark.parametrize("case", KVCACHE_BACKWARD)
def test_kvcache_chain_gradients_match_oracle(case: Case, dtype: torch.dtype) -> None:
    """FA3's kvcache entry point has a backward without appends: q, k_cache, v_cache (and sinks)."""
    gen = torch.Generator().manual_seed(sum(case.lens_k) + 7)
    batch, max_q = len(case.lens_q), max(case.lens_q)
    cap = -(-max(case.lens_k) // max(case.page, 1)) * max(case.page, 1)
    q = torch.randn(batch, max_q, case.hq, case.d, generator=gen).to(dtype).double()
    k = torch.randn(batch, cap, case.hkv, case.d, generator=gen).to(dtype).double()
    v = torch.randn(batch, cap, case.hkv, case.dv, generator=gen).to(dtype).double()
    sinks = torch.randn(case.hq, generator=gen).to(dtype).double() if case.sinks else None
    q_mask = torch.arange(max_q).view(1, -1) < torch.tensor(case.lens_q).view(-1, 1)
    k_mask = torch.arange(cap).view(1, -1) < torch.tensor(case.lens_k).view(-1, 1)
    masks: dict[str, Any] = {
        "causal": case.causal,
        "window": tuple(None if w < 0 else w for w in case.window),
        "chunk": 0,
        "softcap": case.softcap,
    }
    grad_out = torch.randn(batch, max_q, case.hq, case.dv, generator=gen, dtype=torch.float64)

    def oracle_grads(compute: torch.dtype) -> tuple[Tensor, tuple[Tensor, ...]]:
        leaves = [t.to(compute).requires_grad_() for t in (q, k, v, *([sinks] if sinks is not None else []))]
        out, _ = _upstream_ref(
            leaves[0],
            leaves[1],
            leaves[2],
            q_mask,
            k_mask,
            sinks=leaves[3] if sinks is not None else None,
            dtype=compute,
            **masks,
        )
        return out, torch.autograd.grad(out, leaves, grad_out.to(compute))

    oracle, want = oracle_grads(torch.float64)
    table = None
    caches = [k, v]
    if case.page:
        per_seq = cap // case.page
        table = (
            torch.randperm(batch * per_seq + 2, generator=gen)[: batch * per_seq].view(batch, per_seq).int()
        )
        caches = [_paged(t, table).nan_to_num(0.0) for t in caches]
    packed = case.entry == "packed"
    inputs = [t.to(dtype).requires_grad_() for t in (q[q_mask] if packed else q, *caches)]
    inputs += [sinks.to(dtype).requires_grad_()] if sinks is not None else []
    out = chain_kvcache(
        *inputs[:3],
        cache_seqlens=torch.tensor(case.lens_k, dtype=torch.int32),
        page_table=table,
        cu_seqlens_q=_cu_of(q_mask) if packed else None,
        causal=case.causal,
        window_size=case.window,
        softcap=case.softcap,
        sinks=inputs[3] if sinks is not None else None,
    )
    want_backend = fast.REFERENCE_FLOAT64 if dtype == torch.float64 else fast.REFERENCE_AUTOGRAD
    assert fast.last_backend("flash_attn_with_kvcache") == want_backend
    got = list(torch.autograd.grad(out, inputs, (grad_out[q_mask] if packed else grad_out).to(dtype)))
    # Back to the oracle's layout: padded queries, logical caches.
    if packed:
        full = torch.zeros(*q.shape, dtype=dtype)
        full[q_mask] = got[0]
        got[0] = full
    if table is not None:
        spare = torch.ones(got[1].shape[0], dtype=torch.bool)
        spare[table.reshape(-1).long()] = False
        for i in (1, 2):
            assert torch.equal(got[i][spare], torch.zeros_like(got[i][spare]))  # never read
            got[i] = got[i][table.reshape(-1).long()].reshape(batch, cap, *got[i].shape[2:])
    if dtype == torch.float64:
        torch.testing.assert_close(out, oracle[q_mask] if packed else oracle, rtol=1e-12, atol=1e-12)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
        return
    _, plain = oracle_grads(dtype)
    for g, p, w in zip(got, plain, want, strict=True):
        _within_upstream_rule(g, p, w, case.softcap)
